"""Routing agreement: inside every ODConv layer, what a runtime computed against PyTorch.

Runs a :class:`~odconv_deploy.validation.probes.ProbedModel` (PyTorch, eager) and the
artifacts exported from it on the same seeded input, and compares every probe with the
project's one tolerance rule at the artifact's precision: per layer, the kernel-choice
agreement (the share of samples whose argmax of the kernel attention matches PyTorch's), each
attention's error and the layer output's. The first layer in execution order that leaves
tolerance is named: where a runtime starts to compute something else.

The reference is the deploy form in PyTorch, which the conversion proved equal to the train
form in float64, layer by layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from odconv_deploy.runners import TorchRunner
from odconv_deploy.status import Status
from odconv_deploy.tables import markdown_table
from odconv_deploy.validation.compare import OutputComparison, Tolerance, compare_output
from odconv_deploy.validation.inputs import seeded_feed
from odconv_deploy.validation.probes import PROBE_KINDS, ProbedModel
from odconv_deploy.validation.validate import Candidate


@dataclass
class LayerAgreement:
    """One ODConv layer as one runner computed it."""

    index: int
    layer: str
    kernel_agreement: float | None  # None: the layer has one kernel (no kernel attention)
    probes: dict[str, OutputComparison] = field(default_factory=dict)  # kind -> figures

    @property
    def passed(self) -> bool:
        """Every probe of the layer within tolerance."""
        return all(self.probes.values())

    @property
    def failures(self) -> list[str]:
        """``kind: reason`` of each probe out of tolerance."""
        return [f"{kind}: {c.reason}" for kind, c in self.probes.items() if not c]


@dataclass
class RunnerRouting:
    """Every layer's agreement for one runner at one batch."""

    runner: str
    precision: str
    batch: int
    tolerance: Tolerance
    layers: list[LayerAgreement] = field(default_factory=list)
    error: str | None = None  # the runner failed to produce outputs

    @property
    def passed(self) -> bool:
        """The runner ran and every layer agreed."""
        return self.error is None and all(layer.passed for layer in self.layers)

    @property
    def first_diverging(self) -> LayerAgreement | None:
        """The first layer, in execution order, with a probe out of tolerance."""
        return next((layer for layer in self.layers if not layer.passed), None)


@dataclass
class RoutingReport:
    """Routing agreement of every runner, plus what was skipped and why."""

    runs: list[RunnerRouting] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (runner, reason)

    @property
    def passed(self) -> bool:
        """True when every runner that ran agreed in every layer."""
        return all(run.passed for run in self.runs)

    @property
    def status(self) -> Status:
        """``ok``, ``failed``, or ``skipped`` when no runner could run."""
        if not self.runs:
            return Status.SKIPPED
        return Status.OK if self.passed else Status.FAILED

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view, every figure of every probe."""
        return {"status": self.status.value, "passed": self.passed,
                "skipped": [{"runner": r, "reason": why} for r, why in self.skipped],
                "runs": [{
                    "runner": run.runner, "precision": run.precision, "batch": run.batch,
                    "rule": run.tolerance.rule, "error": run.error, "passed": run.passed,
                    "first_diverging": (None if run.first_diverging is None
                                        else run.first_diverging.layer),
                    "layers": [{"index": layer.index, "layer": layer.layer,
                                "kernel_agreement": layer.kernel_agreement,
                                "passed": layer.passed, "failures": layer.failures,
                                "probes": {kind: {"max_abs": c.max_abs, "max_rel": c.max_rel,
                                                  "cosine": c.cosine, "passed": c.passed}
                                           for kind, c in layer.probes.items()}}
                               for layer in run.layers]}
                    for run in self.runs]}

    def to_json(self) -> str:
        """The report as JSON."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        """Per runner the verdict and first diverging layer; per layer the worst figures."""
        summary = []
        for run in self.runs:
            first = run.first_diverging
            verdict = ("pass" if run.passed else f"FAILED: {run.error}" if run.error
                       else f"FAILED at layer {first.index} {first.layer} "
                            f"({'; '.join(first.failures)})")
            agreements = [layer.kernel_agreement for layer in run.layers
                          if layer.kernel_agreement is not None]
            summary.append([run.runner, run.batch, len(run.layers),
                            f"{min(agreements):.2f}" if agreements else "-", verdict])
        lines = ["Routing agreement (every ODConv layer's attentions and output against the "
                 "PyTorch deploy form, same input; kernel choice = argmax of the kernel "
                 "attention):", "",
                 *markdown_table(["runner", "batch", "layers", "min kernel-choice agreement",
                                  "verdict"], summary)]
        for precision in sorted({run.precision for run in self.runs}):
            ran = [run for run in self.runs
                   if run.precision == precision and run.error is None and run.layers]
            if ran:
                lines += ["", f"Per layer, worst over the {precision} runners above "
                          "(attentions: max abs error; output: max error / max |ref|):", "",
                          *markdown_table(["#", "layer", "kernel choice", *(
                              f"{k} err" for k in PROBE_KINDS)], _layer_rows(ran))]
        lines += [f"- skipped {r}: {why}" for r, why in self.skipped]
        return "\n".join(lines) + "\n"


def _layer_rows(runs: Sequence[RunnerRouting]) -> list[list[object]]:
    """One row per layer: the worst figure of each probe over ``runs`` (FAIL if any failed)."""
    rows: list[list[object]] = []
    for i, name in enumerate(layer.layer for layer in runs[0].layers):
        per_runner = [run.layers[i] for run in runs if i < len(run.layers)]
        agreement = [a.kernel_agreement for a in per_runner if a.kernel_agreement is not None]
        cells = []
        for kind in PROBE_KINDS:
            values = [a.probes[kind] for a in per_runner if kind in a.probes]
            if not values:
                cells.append("-")
                continue
            worst = max(values, key=lambda c: c.max_rel)
            figure = worst.max_rel if kind == "output" else worst.max_abs
            cells.append(f"{figure:.1e}" + ("" if all(values) else " FAIL"))
        rows.append([i, name, f"{min(agreement):.2f}" if agreement else "-", *cells])
    return rows


def _kernel_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float((reference.argmax(axis=1) == candidate.argmax(axis=1)).mean())


def _agreement(probed: ProbedModel, expected: dict[str, np.ndarray],
               got: dict[str, np.ndarray], run: RunnerRouting) -> None:
    layers: dict[str, LayerAgreement] = {}
    for probe in probed.probes:
        layer = layers.setdefault(probe.layer, LayerAgreement(probe.index, probe.layer, None))
        ref, cand = expected[probe.name], got[probe.name]
        layer.probes[probe.kind] = compare_output(probe.name, ref, cand, run.tolerance)
        if probe.kind == "kernel" and ref.shape == cand.shape:
            layer.kernel_agreement = _kernel_agreement(ref, cand)
    run.layers = sorted(layers.values(), key=lambda layer: layer.index)


def check_routing(probed: ProbedModel, candidates: Sequence[Candidate], *, batch: int = 3,
                  seed: int = 0, progress: Callable[[str], None] = lambda _: None
                  ) -> RoutingReport:
    """Run ``probed`` in PyTorch and every candidate (artifacts of ``probed``) and compare.

    A candidate whose artifact has a fixed batch runs at that batch; one that cannot run on
    this machine is recorded as skipped with the reason; one that fails is a failed run
    carrying the error.
    """
    report = RoutingReport()
    reference = TorchRunner(probed, probed.io_spec, name="torch (deploy form, probed)")
    expected: dict[int, dict[str, np.ndarray]] = {}
    for cand in (c for c in candidates if not c.bound_only):
        progress(f"routing {cand.runner.name}")
        problem = cand.activate()
        if problem is not None and problem[0] is Status.SKIPPED:
            report.skipped.append((cand.runner.name, problem[1]))
            continue
        run = RunnerRouting(cand.runner.name, cand.precision, batch, cand.rule)
        report.runs.append(run)
        if problem is not None:
            run.error = problem[1]
            continue
        try:
            if not cand.runner.accepts_batch(batch):
                run.batch = next(m.shape[0] for m in cand.runner.input_metadata() if m.shape)
            feed = seeded_feed(probed.io_spec, run.batch, seed=seed)
            if run.batch not in expected:
                with reference:
                    expected[run.batch] = reference.infer(feed)
            got = cand.runner.infer(feed)
            run.tolerance = cand.rule_for(feed)
            _agreement(probed, expected[run.batch], got, run)
        except Exception as exc:  # noqa: BLE001 - a failed run is a failed check, recorded
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            cand.runner.deactivate()
    return report
