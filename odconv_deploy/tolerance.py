"""The one "within tolerance" rule, used by conversion, simplification and validation checks.

``max|err| <= max(atol, rtol * max|ref|)``: relative to the reference's largest magnitude,
with an absolute floor for outputs near zero. A NaN error never passes.
"""

from __future__ import annotations


def allowed_error(reference_max: float, *, rtol: float, atol: float) -> float:
    """The largest max-abs error the rule accepts for a reference whose max |value| is given."""
    return max(atol, rtol * reference_max)


def within_tolerance(max_abs_error: float, reference_max: float, *, rtol: float,
                     atol: float) -> bool:
    """Whether ``max_abs_error`` passes the rule (False for NaN)."""
    return max_abs_error <= allowed_error(reference_max, rtol=rtol, atol=atol)
