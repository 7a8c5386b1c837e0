"""Run every runner on the same seeded inputs and compare each with the reference."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from odconv_deploy.io_spec import IOSpec
from odconv_deploy.runners.base import Runner
from odconv_deploy.runners.coreml_runner import BackendUnavailableError
from odconv_deploy.status import Status
from odconv_deploy.tables import markdown_table
from odconv_deploy.validation.compare import DEFAULT_TOLERANCES, Comparison, Tolerance, compare
from odconv_deploy.validation.inputs import feed_issues, validation_feeds
from odconv_deploy.validation.on_device import OnDeviceReport, merge_on_device

FP16_MAX = 65504.0


@dataclass
class Candidate:
    """A runner to check, the precision its artifact computes in, and an optional tolerance.

    ``tolerance_for`` derives the tolerance from the inputs (an error model, e.g. the fp16
    rounding spread of :class:`~odconv_deploy.validation.fp16_bounds.Fp16ErrorModel`); it
    takes precedence over ``tolerance``. ``bound_only`` marks a runner that brackets the
    numbers (the MIL executor's fp16-accumulation model): it is compared at the smallest batch
    only, and the routing check leaves it out.
    """

    runner: Runner
    precision: str = "fp32"
    tolerance: Tolerance | None = None
    tolerance_for: Callable[[dict[str, np.ndarray]], Tolerance] | None = None
    bound_only: bool = False

    @property
    def rule(self) -> Tolerance:
        """The fixed tolerance: its own, else the precision's default."""
        return self.tolerance or DEFAULT_TOLERANCES[self.precision]

    def rule_for(self, feed: dict[str, np.ndarray]) -> Tolerance:
        """The tolerance for outputs on ``feed``: derived when an error model is set."""
        return self.tolerance_for(feed) if self.tolerance_for is not None else self.rule

    def activate(self) -> tuple[Status, str] | None:
        """Activate the runner; None when it runs, else why not.

        Skipped: a backend this machine lacks; failed: it cannot load the artifact. Both come
        with the reason.
        """
        try:
            self.runner.activate()
        except BackendUnavailableError as exc:
            return Status.SKIPPED, str(exc)
        except Exception as exc:  # noqa: BLE001 - a failed load is a failed check
            return Status.FAILED, f"{type(exc).__name__}: {exc}"
        return None


@dataclass
class ValidationReport:
    """Comparisons of every candidate at every batch, plus what was skipped and why."""

    reference: str
    comparisons: list[Comparison] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (runner, reason)
    input_issues: list[str] = field(default_factory=list)
    #: The "on device" section, when devices were asked for.
    on_device: OnDeviceReport | None = None

    @property
    def passed(self) -> bool:
        """True when every comparison passed and the inputs were clean (skips do not fail)."""
        return not self.input_issues and all(self.comparisons)

    @property
    def status(self) -> Status:
        """``ok`` when passed, ``failed`` otherwise; ``skipped`` when every runner was skipped."""
        if self.skipped and not self.comparisons and not self.input_issues:
            return Status.SKIPPED
        return Status.OK if self.passed else Status.FAILED

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return {"reference": self.reference, "passed": self.passed,
                "status": self.status.value,
                "input_issues": self.input_issues,
                "skipped": [{"runner": r, "reason": why} for r, why in self.skipped],
                "comparisons": [c.to_dict() for c in self.comparisons],
                "on_device": None if self.on_device is None else self.on_device.to_dict()}

    def to_json(self) -> str:
        """The report as JSON."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        """A readable table: one row per runner, batch and output."""
        rows = []
        for c in self.comparisons:
            if c.error:
                rows.append([c.runner, c.batch, *["-"] * 6, f"FAILED: {c.error}"])
            for o in c.outputs:
                top1 = "-" if o.top1_agreement is None else f"{o.top1_agreement:.2f}"
                verdict = "pass" if o.passed else f"FAILED: {o.reason}"
                rows.append([c.runner, c.batch, o.name, f"{o.max_abs:.2e}", f"{o.max_rel:.2e}",
                             f"{o.cosine:.6f}", f"{o.sqnr_db:.1f}", top1, verdict])
        lines = [f"Reference: {self.reference}", "", *markdown_table(
            ["runner", "batch", "output", "max abs", "max rel", "cosine", "SQNR dB", "top-1",
             "verdict"], rows)]
        defaults = set(DEFAULT_TOLERANCES.values())
        lines += [f"- tolerance of {c.runner} at batch {c.batch}: {c.tolerance.rule}"
                  for c in self.comparisons if c.tolerance not in defaults]
        lines += [f"- input issue: {i}" for i in self.input_issues]
        lines += [f"- skipped {r}: {why}" for r, why in self.skipped]
        if self.on_device is not None:
            lines += ["", self.on_device.to_markdown().rstrip("\n")]
        return "\n".join(lines) + "\n"


def merge_reports(reports: Sequence[ValidationReport]) -> ValidationReport:
    """One report of several made against different references (names joined by "; ")."""
    merged = ValidationReport(reference="; ".join(r.reference for r in reports))
    for report in reports:
        merged.comparisons += report.comparisons
        merged.skipped += report.skipped
        merged.input_issues += [i for i in report.input_issues if i not in merged.input_issues]
    merged.on_device = merge_on_device([r.on_device for r in reports])
    return merged


def _fp16_range_issue(reference: dict[str, np.ndarray]) -> str | None:
    peak = max(float(np.abs(v[np.isfinite(v)]).max(initial=0.0)) for v in reference.values())
    if peak > FP16_MAX:
        return (f"reference outputs reach |y| = {peak:.3g}, beyond the fp16 range "
                f"({FP16_MAX:g}); an fp16 artifact cannot represent them")
    return None


def validate(reference: Runner, candidates: Sequence[Candidate], io_spec: IOSpec, *,
             batches: Sequence[int] = (1, 3), seed: int = 0, image_folder: str | None = None,
             progress: Callable[[str], None] = lambda _: None) -> ValidationReport:
    """Feed identical inputs to the reference and every candidate and compare the outputs.

    A candidate is run at each batch size its inputs accept (one that accepts none of
    ``batches``, e.g. a graph with batch 8 baked in, is a failed comparison saying so); a
    backend that cannot run on this machine is recorded as skipped with the reason; a runner
    that fails to load or run is a failed comparison carrying the error.

    Args:
        reference: The runner whose outputs are the truth (usually PyTorch, train form).
        candidates: Runners to check.
        io_spec: The model's I/O spec (input names, shapes, preprocessing).
        batches: Batch sizes to try.
        seed: Seed of the random inputs.
        image_folder: Use real images from this folder instead of random inputs.
        progress: Told which runner is being checked.
    """
    feeds = validation_feeds(io_spec, batches, seed=seed, image_folder=image_folder)
    return validate_feeds(reference, candidates, feeds,
                          classifier=io_spec.task == "classification", progress=progress)


def validate_feeds(reference: Runner, candidates: Sequence[Candidate],
                   feeds: dict[int, dict[str, np.ndarray]], *, classifier: bool = False,
                   progress: Callable[[str], None] = lambda _: None) -> ValidationReport:
    """:func:`validate` on given inputs, one feed per batch size (e.g. recorded ones)."""
    report = ValidationReport(reference=reference.name)
    batches = tuple(feeds)
    for batch, feed in feeds.items():
        report.input_issues += [f"batch {batch}: {i}" for i in feed_issues(feed)]
    with reference:
        expected = {b: reference.infer(f) for b, f in feeds.items()}
    for cand in candidates:
        progress(f"validate {cand.runner.name}")
        tolerance = cand.rule
        problem = cand.activate()
        if problem is not None:
            status, reason = problem
            if status is Status.SKIPPED:
                report.skipped.append((cand.runner.name, reason))
            else:
                report.comparisons.append(Comparison(cand.runner.name, 0, tolerance,
                                                     error=reason))
            continue
        try:
            taken = [b for b in feeds if cand.runner.accepts_batch(b)]
            if cand.bound_only:
                taken = sorted(taken)[:1]
            if not taken:
                fixed = [m.shape[0] for m in cand.runner.input_metadata() if m.shape]
                report.comparisons.append(Comparison(
                    cand.runner.name, 0, tolerance,
                    error=f"takes none of the batch sizes tried {tuple(batches)} (its inputs "
                          f"have batch {fixed[0] if fixed else '?'}), so nothing was compared. "
                          "Note: validate with that batch size (batches=... / --batch)."))
            for batch, feed in feeds.items():
                if batch not in taken:
                    continue
                try:
                    got = cand.runner.infer(feed)
                    rule = cand.rule_for(feed)
                except Exception as exc:  # noqa: BLE001 - recorded with the comparison
                    report.comparisons.append(Comparison(cand.runner.name, batch, tolerance,
                                                         error=f"{type(exc).__name__}: {exc}"))
                    continue
                result = compare(cand.runner.name, batch, expected[batch], got, rule,
                                 classifier=classifier)
                if cand.precision == "fp16":
                    issue = _fp16_range_issue(expected[batch])
                    for o in result.outputs:
                        if issue:
                            o.passed, o.reason = False, issue
                        elif o.non_finite:
                            o.reason += " (fp16 overflow of an intermediate value?)"
                report.comparisons.append(result)
        finally:
            cand.runner.deactivate()
    return report
