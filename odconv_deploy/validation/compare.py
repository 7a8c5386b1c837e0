"""Numerical comparison of one runner's outputs against a reference (after Polygraphy).

Comparison returns result objects, truthy when passed, that carry every figure and name the
rule that decided. A NaN/Inf gate runs first: a non-finite output never passes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from odconv_deploy.status import Status
from odconv_deploy.tolerance import within_tolerance


@dataclass(frozen=True)
class Tolerance:
    """Pass rule: ``max|cand - ref| <= max(atol, rtol * max|ref|)`` and ``cosine >= min_cosine``.

    The first half is the project's one rule (:mod:`odconv_deploy.tolerance`).

    Defaults per precision live in :data:`DEFAULT_TOLERANCES`; every field is keyword-only.
    """

    rtol: float
    atol: float
    min_cosine: float

    @property
    def rule(self) -> str:
        """The rule in words, for reports."""
        return (f"max|err| <= max({self.atol:g}, {self.rtol:g}*max|ref|) and "
                f"cosine >= {self.min_cosine:g}")


#: Documented defaults. fp32: rounding noise of reordered float32 sums over deep networks.
#: fp16: CoreML fp16 programs store every activation in half precision (~1e-3 relative per
#: op, compounding over depth).
#: int8: ONNX Runtime's int8 kernels against the QDQ graph computed as written; each
#: requantization may round one step apart, and the steps compound over depth (measured 2.3e-3
#: of max |ref| on od_resnet18 k=4: validate --precision int8 --formats onnx-sim, batch 3).
DEFAULT_TOLERANCES = {
    "fp32": Tolerance(rtol=1e-4, atol=1e-5, min_cosine=0.99999),
    "fp16": Tolerance(rtol=3e-2, atol=1e-3, min_cosine=0.999),
    "int8": Tolerance(rtol=2e-2, atol=1e-3, min_cosine=0.9995),
}


@dataclass
class OutputComparison:
    """Figures for one output tensor."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float  # max|err| / max|ref|
    mean_abs: float
    cosine: float
    sqnr_db: float
    reference_max_abs: float
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    non_finite: int = 0
    passed: bool = False
    reason: str = ""

    def __bool__(self) -> bool:
        return self.passed


@dataclass
class Comparison:
    """All outputs of one runner at one batch size against the reference."""

    runner: str
    batch: int
    tolerance: Tolerance
    outputs: list[OutputComparison] = field(default_factory=list)
    error: str | None = None  # set when the runner failed to produce outputs

    @property
    def passed(self) -> bool:
        """True when the runner ran and every output passed."""
        return self.error is None and all(self.outputs)

    @property
    def status(self) -> Status:
        """``ok`` when passed, else ``failed`` (see ``error`` and each output's ``reason``)."""
        return Status.OK if self.passed else Status.FAILED

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view (the rule spelled out)."""
        data = asdict(self)
        data["tolerance"] = {**asdict(self.tolerance), "rule": self.tolerance.rule}
        data["passed"] = self.passed
        data["status"] = self.status.value
        return data


def _topk_agreement(ref: np.ndarray, cand: np.ndarray, k: int) -> float | None:
    if ref.ndim != 2 or ref.shape[1] < k:
        return None
    ref_top1 = ref.argmax(axis=1)
    cand_topk = np.argsort(-cand, axis=1)[:, :k]
    return float(np.mean([r in c for r, c in zip(ref_top1, cand_topk, strict=True)]))


def compare_output(name: str, reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance,
                   *, classifier: bool = False) -> OutputComparison:
    """Compare one output; computed in float64."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        return OutputComparison(name, tuple(cand.shape), math.inf, math.inf, math.inf, 0.0,
                                -math.inf, float(np.abs(ref).max(initial=0.0)), passed=False,
                                reason=f"shape {tuple(cand.shape)} != reference {ref.shape}")
    non_finite = int((~np.isfinite(cand)).sum())
    err = np.abs(cand - ref)
    ref_max = float(np.abs(ref).max(initial=0.0))
    max_abs = float(err.max(initial=0.0))
    signal = float((ref ** 2).sum())
    noise = float(((cand - ref) ** 2).sum())
    denom = math.sqrt(signal * float((cand ** 2).sum()))
    result = OutputComparison(
        name=name, shape=tuple(ref.shape), max_abs=max_abs,
        max_rel=max_abs / ref_max if ref_max else max_abs,
        mean_abs=float(err.mean()) if err.size else 0.0,
        cosine=float((ref * cand).sum() / denom) if denom else float(noise == 0.0),
        sqnr_db=10 * math.log10(signal / noise) if noise else math.inf,
        reference_max_abs=ref_max, non_finite=non_finite,
        top1_agreement=_topk_agreement(ref, cand, 1) if classifier else None,
        top5_agreement=_topk_agreement(ref, cand, 5) if classifier else None,
    )
    if non_finite or not np.isfinite(ref).all():
        result.reason = (f"{non_finite} non-finite values in the output" if non_finite
                         else "the reference itself has non-finite values")
    elif not within_tolerance(max_abs, ref_max, rtol=tolerance.rtol, atol=tolerance.atol):
        result.reason = (f"max|err| {max_abs:.3e} > max({tolerance.atol:g}, {tolerance.rtol:g} * "
                         f"{ref_max:.3e})")
    elif not result.cosine >= tolerance.min_cosine:
        result.reason = f"cosine {result.cosine:.6f} < {tolerance.min_cosine:g}"
    else:
        result.passed = True
    return result


def compare(runner: str, batch: int, reference: dict[str, np.ndarray],
            candidate: dict[str, np.ndarray], tolerance: Tolerance, *, classifier: bool = False
            ) -> Comparison:
    """Compare every reference output with the candidate's output of the same name."""
    result = Comparison(runner, batch, tolerance)
    missing = sorted(set(reference) - set(candidate))
    if missing:
        result.error = f"outputs {missing} missing (got {sorted(candidate)})"
        return result
    for name, ref in reference.items():
        result.outputs.append(compare_output(name, ref, candidate[name], tolerance,
                                             classifier=classifier))
    return result
