"""The fp16 error model of a Core ML program: tolerances derived from its own rounding.

An fp16 Core ML program is checked by the MIL executor twice against PyTorch: rounded once
per op (optimistic: what hardware accumulating in float32 computes) and with fp16 running
sums (pessimistic: hardware accumulating in fp16). Neither is held to a constant. The same
program also runs with no fp16 rounding of values at all, and for each model ``r``

    spread(r)     = max|y_r - y_no_rounding| / max|y_no_rounding|           (worst output)
    rtol(r)       = ROUNDING_MARGIN * (spread(r) + spread(per_op)),   at least the fp32 rtol
    min_cosine(r) = 1 - ROUNDING_MARGIN**2 * (d(r) + d(per_op)),  d = 1 - cosine(y_r, y_none)

(``1 - cosine`` grows with the square of a relative error, hence the squared margin; the
cosine bound is never stricter than fp32's.)

The runs execute the same ops on the same inputs and differ only in rounding, so a conversion
error (a wrong op, a wrong weight) cancels out of every spread and never widens a tolerance;
it shows in the comparison with PyTorch. ``spread(per_op)`` stands in for the rounding of the
weights stored in fp16 (present in all runs, so no spread sees it): one rounding per weight
against one per op, the same order (measured: on od_tinynet, od_resnet18 and
od_mobilenetv2_050 the no-rounding run's error against PyTorch, which is that weight rounding,
was 0.6-0.9x spread(per_op)). ``ROUNDING_MARGIN`` covers accumulation orders other than the
executor's. The spreads and the rules are reported with every comparison.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from odconv_deploy.validation.compare import DEFAULT_TOLERANCES, Tolerance

#: How far beyond the executor's own fp16-accumulation spread an artifact may be.
ROUNDING_MARGIN = 2.0


@dataclass(frozen=True)
class RoundingSpread:
    """The measured rounding spreads of one program, and the tolerances from them."""

    per_op: float  # max|y_per_op - y_no_rounding| / max|y_no_rounding|, worst output
    per_term: float  # the same for fp16 accumulation
    cosine_gap: dict[str, float]  # rounding model -> worst 1 - cosine(y_r, y_no_rounding)
    tolerances: dict[str, Tolerance]  # rounding model -> its tolerance


class Fp16ErrorModel:
    """Derives the tolerances of an fp16 Core ML program from the program's rounding spreads.

    Args:
        source: The ``.mlpackage`` path (or anything ``load_mil_program`` accepts).
        margin: The factor over the measured spreads.

    The spreads are measured once, on the first sample of the first feed (three executions
    of one sample; rounding does not depend on the batch size), and serve every batch.
    """

    def __init__(self, source: str | os.PathLike | Any, *,
                 margin: float = ROUNDING_MARGIN) -> None:
        self.source = os.fspath(source) if isinstance(source, (str, os.PathLike)) else source
        self.margin = margin
        self._spread: RoundingSpread | None = None

    @property
    def spread(self) -> RoundingSpread | None:
        """The measured spreads (None until the first :meth:`tolerance`)."""
        return self._spread

    def tolerance(self, feed: dict[str, np.ndarray], rounding: str = "per_op") -> Tolerance:
        """The tolerance of the ``rounding`` model's outputs on ``feed``.

        ``rounding`` is ``per_op`` or ``per_term``; the spreads are measured on first use.
        """
        if self._spread is None:
            self._spread = self._measure({k: np.asarray(v)[:1] for k, v in feed.items()})
        return self._spread.tolerances[rounding]

    def tolerance_of(self, rounding: str) -> Callable[[dict[str, np.ndarray]], Tolerance]:
        """:meth:`tolerance` for one rounding model, as a ``Candidate.tolerance_for``."""
        return lambda feed: self.tolerance(feed, rounding)

    def _measure(self, feed: dict[str, np.ndarray]) -> RoundingSpread:
        from odconv_deploy.runners.mil import MILExecutor, load_mil_program

        program = load_mil_program(self.source)
        runs = {r: MILExecutor(program, rounding=r).run(feed)
                for r in ("none", "per_op", "per_term")}
        models = ("per_op", "per_term")
        worst = {r: _worst(runs[r], runs["none"]) for r in models}
        spread = {r: worst[r][0] for r in models}
        gap = {r: worst[r][1] for r in models}
        floor = DEFAULT_TOLERANCES["fp32"]
        tolerances = {
            r: Tolerance(rtol=max(self.margin * (spread[r] + spread["per_op"]), floor.rtol),
                         atol=floor.atol,
                         min_cosine=min(1 - self.margin ** 2 * (gap[r] + gap["per_op"]),
                                        floor.min_cosine))
            for r in models}
        return RoundingSpread(spread["per_op"], spread["per_term"], gap, tolerances)


def _worst(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]
           ) -> tuple[float, float]:
    """Worst over outputs of ``max|out - ref| / max|ref|`` and of ``1 - cosine(out, ref)``."""
    relative, gap = 0.0, 0.0
    for name, ref in reference.items():
        ref = np.asarray(ref, np.float64).ravel()
        out = np.asarray(outputs[name], np.float64).ravel()
        relative = max(relative, float(np.abs(out - ref).max(initial=0.0)
                                       / max(np.abs(ref).max(initial=0.0), 1e-30)))
        norms = float(np.linalg.norm(out) * np.linalg.norm(ref))
        gap = max(gap, 1.0 - float(out @ ref) / norms if norms else 0.0)
    return relative, gap
