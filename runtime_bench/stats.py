"""Latency statistics: medians and spread, never a single mean."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    """Summary of latency samples in milliseconds."""

    n: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    std_ms: float
    iqr_ms: float  # interquartile range: the spread that ignores outliers

    @property
    def spread_pct(self) -> float:
        """IQR as a percentage of the median."""
        return 100.0 * self.iqr_ms / self.median_ms if self.median_ms else 0.0

    def to_dict(self) -> dict[str, float]:
        """JSON-ready view."""
        return {**asdict(self), "spread_pct": self.spread_pct}


def summarize(seconds: list[float] | np.ndarray) -> LatencyStats:
    """Statistics of latency samples given in seconds.

    Raises:
        ValueError: No samples.
    """
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("No latency samples to summarise.")
    q25, q50, q75, q90, q99 = np.percentile(ms, [25, 50, 75, 90, 99])
    return LatencyStats(n=int(ms.size), median_ms=float(q50), p90_ms=float(q90),
                        p99_ms=float(q99), min_ms=float(ms.min()), max_ms=float(ms.max()),
                        mean_ms=float(ms.mean()), std_ms=float(ms.std()),
                        iqr_ms=float(q75 - q25))


def paired_ratio(a_seconds: list[float], b_seconds: list[float]) -> dict[str, float]:
    """Ratio of A to B from interleaved rounds: median of per-round ratios and its IQR.

    Interleaving A and B round by round makes slow drifts of a shared machine hit both.
    """
    a, b = np.asarray(a_seconds), np.asarray(b_seconds)
    if a.size != b.size or a.size == 0:
        raise ValueError(f"Paired samples must have equal, non-zero length ({a.size}, {b.size}).")
    ratios = a / b
    q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
    return {"ratio_median": float(q50), "ratio_q25": float(q25), "ratio_q75": float(q75),
            "ratio_of_medians": float(np.median(a) / np.median(b)), "rounds": int(a.size)}
