"""The main job: from a model to a deployment report (``odconv-deploy run``).

Steps: load, convert (verified), export every format, validate every artifact on every
runtime that can run it, benchmark beside the static twin, report. A failed step is recorded
and the later steps that do not depend on it still run; the report is rewritten after every
step, so partial results survive a crash or an interrupt.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from odconv_deploy._atomic import atomic_output, check_writable
from odconv_deploy.calibration import resolve_calibration
from odconv_deploy.conversions import Conversions, save_deploy_checkpoint
from odconv_deploy.devices import parse_device
from odconv_deploy.digits import DIGITS_MODELS
from odconv_deploy.layers.deploy import DEFAULT_STRATEGY
from odconv_deploy.model_source import LoadedModel, load_model
from odconv_deploy.status import Status
from odconv_deploy.strategy_choice import AUTO_STRATEGY, TUNE_STRATEGY
from odconv_deploy.tables import markdown_table
from odconv_deploy.tolerance import within_tolerance

#: float32 whole-model tolerance of train form vs deploy form (relative to max |logit|).
FP32_MODEL_RTOL = 1e-4

StepOutcome = tuple[Status, str, dict[str, object]]


@dataclass
class PipelineOptions:
    """What ``run_pipeline`` does; the CLI maps its flags one to one.

    ``model`` is any model source (:func:`odconv_deploy.model_source.load_model`): a zoo name,
    ``package.module:callable``, a model file or an ``nn.Module``; ``kernel_num`` applies to
    ODConv zoo models (default 4), ``model_args`` to zoo builders and callables,
    ``input_shape`` to networks without a declared input (``"1,3,640,640"``).
    """

    model: str | nn.Module = "od_resnet18"
    kernel_num: int | None = None
    checkpoint: str | None = None
    model_args: str | None = None
    input_shape: str | list[str] | tuple[int, ...] | None = None
    trust_pickle: bool = False
    strategy: str | None = None  # default: a deploy checkpoint's own, else DEFAULT_STRATEGY
    precision: str = "fp32"  # a key of odconv_deploy.quantize.PRECISIONS
    #: int8's calibration: a folder, Python data (odconv_deploy.calibration), or None (a
    #: digits model's training split; any other model is refused).
    calibration: object = None
    reduce_range: bool = False  # int8: 7-bit weights, for x86 CPUs without VNNI
    formats: tuple[str, ...] = ("onnx", "onnx-sim", "ort", "coreml", "pte")
    bench_formats: tuple[str, ...] = ("onnx-sim", "pte", "torch")
    threads: int = 1
    #: Devices to validate and benchmark on as well (``--device`` values, e.g. ``arm64-emu``).
    devices: tuple[str, ...] = ()
    out: str = "odconv_out"
    overwrite: bool = False
    quick: bool = False
    seed: int = 0


@dataclass
class StepResult:
    """One pipeline step: its status, and the reason (or what it did) in ``detail``."""

    name: str
    status: Status
    seconds: float
    detail: str
    data: dict[str, object] = field(default_factory=dict)


@dataclass
class PipelineReport:
    """Everything a run produced; ``ok`` is False when any step failed."""

    options: PipelineOptions
    steps: list[StepResult] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    sections: dict[str, str] = field(default_factory=dict)  # Markdown per step
    #: The model as the report names it (source and kernel_num), once loaded.
    title_model: str = ""
    strategy: str = DEFAULT_STRATEGY

    @property
    def ok(self) -> bool:
        """True when no step failed."""
        return all(s.status is not Status.FAILED for s in self.steps)

    def summary(self) -> str:
        """One line per step and a verdict."""
        lines = [f"[{s.status:>7}] {s.name} ({s.seconds:.0f} s): {s.detail}" for s in self.steps]
        lines.append(f"{'OK' if self.ok else 'FAILED'}: report in {self.options.out}/report.md")
        return "\n".join(lines)

    def to_json(self) -> str:
        """The report as JSON."""
        options = {**vars(self.options), "model": self.title_model}
        return json.dumps({"options": options, "environment": self.environment,
                           "ok": self.ok, "steps": [asdict(s) for s in self.steps]},
                          indent=2, default=str)

    def to_markdown(self) -> str:
        """The report as Markdown: steps, then one section per step, then the environment."""
        o = self.options
        total = sum(s.seconds for s in self.steps)
        lines = [f"# odconv-deploy report: {self.title_model}", "",
                 f"Verdict: **{'OK' if self.ok else 'FAILED'}** ({total:.0f} s). "
                 f"Strategy `{self.strategy}`; exported {', '.join(o.formats)}; benchmarked "
                 f"{', '.join(o.bench_formats)}.", "",
                 *markdown_table(["step", "status", "seconds", "detail"],
                                 [(s.name, s.status, f"{s.seconds:.1f}", s.detail)
                                  for s in self.steps])]
        for title, body in self.sections.items():
            lines += ["", f"## {title}", "", body.rstrip()]
        lines += ["", "## Environment", ""]
        lines += [f"- {k}: {v}" for k, v in self.environment.items()]
        return "\n".join(lines) + "\n"


def environment() -> dict[str, str]:
    """Machine and library versions stamped into reports."""
    from runtime_bench.probe import machine_info

    return {**machine_info(),
            "platform": platform.platform(), "torch_threads": str(torch.get_num_threads())}


class _Pipeline:
    """State shared by the steps of one run."""

    def __init__(self, options: PipelineOptions, progress: Callable[[str], None]) -> None:
        self.o = options
        self.out = Path(options.out)
        self.progress = progress
        self.report = PipelineReport(options, environment=environment(),
                                     title_model=str(options.model))
        self.loaded: LoadedModel | None = None
        self.conversions: Conversions | None = None
        self.deploy = None
        self.calibration = None
        self.exports: list = []
        self.devices = [parse_device(spec) for spec in options.devices]

    def write(self) -> None:
        with atomic_output(self.out / "report.json", overwrite=True) as tmp:
            tmp.write_text(self.report.to_json())
        with atomic_output(self.out / "report.md", overwrite=True) as tmp:
            tmp.write_text(self.report.to_markdown())

    def step(self, name: str, fn: Callable[[], StepOutcome], *, needs: tuple[str, ...] = ()
             ) -> None:
        index = len(self.report.steps) + 1
        missing = [n for n in needs if not any(s.name == n and s.status is Status.OK
                                               for s in self.report.steps)]
        start = time.perf_counter()
        if missing:
            status, detail, data = Status.SKIPPED, f"needs the {', '.join(missing)} step", {}
        else:
            self.progress(f"[{index}] {name} ...")
            try:
                status, detail, data = fn()
            except Exception as exc:  # noqa: BLE001 - recorded in the report, never swallowed
                status, detail, data = Status.FAILED, f"{type(exc).__name__}: {exc}"[:600], {}
        self.report.steps.append(StepResult(name, status, time.perf_counter() - start,
                                            detail, data))
        self.progress(f"[{index}] {name}: {status}: {detail}")
        self.write()

    # -- steps -----------------------------------------------------------------------------
    def load(self) -> StepOutcome:
        o = self.o
        self.loaded = load_model(o.model, checkpoint=o.checkpoint, kernel_num=o.kernel_num,
                                 model_args=o.model_args, input_shape=o.input_shape,
                                 trust_pickle=o.trust_pickle, seed=o.seed)
        stored = self.loaded.conversion
        strategy = o.strategy or (stored[0].strategy if stored else DEFAULT_STRATEGY)
        self.calibration = resolve_calibration(o.precision, o.calibration, self.loaded.io_spec,
                                               zoo_name=self.loaded.zoo_name)
        self.conversions = Conversions(self.loaded.model, strategy, stored=stored,
                                       progress=lambda s: self.progress(f"    {s}"),
                                       precision=o.precision)
        if strategy == TUNE_STRATEGY:
            self._tune()
        k = self.loaded.kwargs.get("kernel_num")
        self.report.title_model = self.loaded.name + (f" (kernel_num={k})" if k else "")
        self.report.strategy = strategy
        shapes = ", ".join(f"{t.name}{list(t.shape)}" for t in self.loaded.io_spec.inputs)
        outputs = ", ".join(f"{t.name}{list(t.shape)}" for t in self.loaded.io_spec.outputs)
        calibrated = (f"; int8 calibration: {self.calibration.describe()}"
                      if self.calibration is not None else "")
        return Status.OK, (f"{self.loaded.name} ({self.loaded.source}), weights: "
                      f"{self.loaded.weights}; inputs {shapes}; outputs {outputs}{calibrated}"), {}

    def _tune(self) -> None:
        """``tune``: the plans of the exported formats' and the benchmark's targets."""
        from export import parse_formats
        from export.formats import FORMATS
        from runtime_bench.bench_formats import parse_bench_formats
        from runtime_bench.tune import tune_for_targets

        exported = parse_formats(",".join(self.o.formats))
        timed = [b.artifact for b in parse_bench_formats(",".join(self.o.bench_formats))
                 if b.artifact is not None]
        device = next((d for d in self.devices if not d.emulated and d.check().ok), None)
        plans = tune_for_targets(
            self.conversions, self.loaded.io_spec,
            [*(FORMATS[f].auto_target() for f in exported),
             *(FORMATS[f].auto_target("onnxruntime") for f in timed)],  # as bench exports
            device=device, progress=lambda s: self.progress(f"    {s}"))
        self.report.sections["Tuning"] = "\n".join(p.to_markdown() for p in plans)
        with atomic_output(self.out / "tuning.json", overwrite=True) as path:
            path.write_text(json.dumps([p.to_dict() for p in plans], indent=2))

    def convert(self) -> StepOutcome:
        result = self.conversions.get("torch")
        self.deploy = result.model  # the reference of the artifacts (quantized in int8w)
        float_deploy = result.float_deploy
        errors = [layer.max_abs_error for layer in result.layers
                  if layer.max_abs_error is not None]
        worst = max(errors, default=0.0)
        data: dict[str, object] = {"layers": len(result.layers),
                                   "folded_batchnorms": result.folded_bn_count,
                                   "worst_layer_error_fp64": worst}
        spec = self.loaded.io_spec
        for batch in (1, 3):
            inputs = spec.sample_inputs(batch, seed=batch)
            with torch.no_grad():
                ref, got = (_as_tuple(m(*inputs)) for m in (self.loaded.model, float_deploy))
            err = max((r - g).abs().max().item() for r, g in zip(ref, got, strict=True))
            scale = max(r.abs().max().item() for r in ref)
            data[f"model_max_abs_error_fp32_batch{batch}"] = err
            if not within_tolerance(err, scale, rtol=FP32_MODEL_RTOL, atol=FP32_MODEL_RTOL):
                return Status.FAILED, f"deploy form differs at batch {batch}: {err:.2e}", data
        save_deploy_checkpoint(self.out / f"{self.loaded.name}_deploy.pt", self.loaded,
                               replace(result, model=float_deploy, float_model=None),
                               target="torch", dynamic_batch=True, overwrite=True)
        if result.float_model is not None:
            # int8's PyTorch model holds its int8w part; the graph's int8 part is the
            # artifact's, measured by the validate step.
            label = "int8w (the kernel banks of int8)" if self.o.precision == "int8" else None
            self.report.sections["Quantization drift"] = self._drift(float_deploy, data,
                                                                     precision=label)
        if not result.layers:
            return (Status.OK, "0 ODConv layers converted (the network has none); exported as is",
                    data)
        return Status.OK, (f"{len(result.layers)} ODConv layers -> {result.layer_forms}, "
                      f"{result.folded_bn_count} BatchNorms folded; worst layer error (float64) "
                      f"{worst:.1e}; whole model (float32, batch 3) "
                      f"{data['model_max_abs_error_fp32_batch3']:.1e}"), data

    def _drift(self, float_deploy: nn.Module, data: dict[str, object], *,
               quantized: object = None, precision: str | None = None) -> str:
        """A quantized model or artifact runner against float32, as a report section.

        ``quantized`` defaults to the int8w deploy model, measured on seeded inputs; an int8
        artifact's runner is measured on the calibration samples. A digits model adds its
        test set.
        """
        from odconv_deploy.validation.drift import quantization_drift
        from odconv_deploy.validation.inputs import validation_feeds

        spec = self.loaded.io_spec
        names, classifier = spec.output_names, spec.task == "classification"
        if quantized is None:
            quantized = self.deploy
            feeds = [validation_feeds(spec, [8], seed=self.o.seed + i)[8] for i in range(4)]
            inputs = "32 seeded inputs"
        else:
            # Seeded inputs leave an int8 graph's calibrated ranges (and are clipped there):
            # its drift is measured on the calibration samples, in-sample.
            feeds = list(self.calibration.batches(8))
            inputs = f"the {len(self.calibration)} calibration samples (in-sample)"
        precision = precision or self.o.precision
        reports = [quantization_drift(float_deploy, quantized, feeds, names,
                                      precision=precision, inputs=inputs,
                                      classifier=classifier)]
        if self.loaded.zoo_name in DIGITS_MODELS:
            from odconv_deploy.digits import load_digits_test

            test = load_digits_test(self.loaded.zoo_name)
            feeds = [{spec.input_names[0]: test.images[i:i + 60]}
                     for i in range(0, len(test.images), 60)]
            reports.append(quantization_drift(
                float_deploy, quantized, feeds, names, precision=precision,
                inputs=f"the digits test set ({len(test.images)} images)",
                classifier=classifier))
        data.setdefault("drift", []).extend(r.to_dict() for r in reports)
        return "\n".join(r.to_markdown() for r in reports)

    def export(self) -> StepOutcome:
        from export import export_formats, format_layer_forms, parse_formats

        self.exports = export_formats(
            self.loaded.model, self.out / "artifacts", parse_formats(",".join(self.o.formats)),
            stem=self.loaded.name, conversions=self.conversions,
            io_spec=self.loaded.io_spec, overwrite=self.o.overwrite,
            calibration=self.calibration, reduce_range=self.o.reduce_range,
            progress=lambda s: self.progress(f"    {s}"))
        rows: list[list[object]] = []
        for r in self.exports:
            if not r.ok:
                rows.append([r.format.value, "-", "-", "-", f"FAILED: {r.error}"])
                continue
            extra = "; ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in r.details.items()
                              if k in ("nodes_before", "nodes_after", "max_rank",
                                       "conv_matmul_macs_delegated_share", "max_batch_planned"))
            if r.options.get("layer_forms"):
                layers = f"layers: {format_layer_forms(r.options['layer_forms'])}"
                extra = f"{extra}; {layers}" if extra else layers
            split = r.details.get("size_split")
            banks = ("-" if split is None else f"{split['kernel_bank_bytes'] / 1e6:.1f} "
                     f"({split['banks_found']}/{split['banks']} layers)")
            rows.append([r.format.value, f"`{r.path.name}`", f"{r.file_size_bytes / 1e6:.1f}",
                         banks, extra])
            rows += [["", "", "", "", f"note: {n}"] for n in r.notes]
        self.report.sections["Artifacts"] = "\n".join(
            markdown_table(["format", "file", "MB", "of which ODConv kernel banks, MB", "detail"],
                           rows))
        failed = [r.format.value for r in self.exports if not r.ok]
        data = {"artifacts": [r.to_dict() for r in self.exports]}
        if failed:
            return Status.FAILED, f"failed: {', '.join(failed)}", data
        return Status.OK, ", ".join(f"{r.format.value} ({r.file_size_bytes / 1e6:.1f} MB)"
                               for r in self.exports), data

    def validate(self) -> StepOutcome:
        from export.validation import (
            accuracy_table,
            attach_on_device,
            candidates_for,
            device_candidates,
            int8_references,
            quantized_reference_name,
        )
        from odconv_deploy.runners import TorchRunner
        from odconv_deploy.validation.validate import merge_reports, validate

        spec = self.loaded.io_spec
        train = TorchRunner(self.loaded.model, spec, name="torch (train form)")
        precision = self.conversions.precision
        quantized = self.conversions.get("torch").float_model is not None
        data: dict[str, object] = {}
        if precision == "int8":
            # Each int8 artifact's own semantics is its reference (the QDQ graph as written,
            # the .pte's PT2E program); its int8 kernels are held to the int8 rule; what
            # quantizing activations costs is the reference's drift from float32.
            groups = int8_references(self.exports, spec, self.devices)
            float_deploy = self.conversions.get("torch").float_deploy
            drifts = [self._drift(float_deploy, data, quantized=reference,
                                  precision=f"int8 ({reference.name})")
                      for reference, _ in groups]
            self.report.sections["Quantization drift"] = "\n".join(
                [self.report.sections.get("Quantization drift", ""), *drifts])
        elif quantized:
            # An int8w or lut6w artifact must compute what the quantized model does (exactly,
            # at the float rules); its distance from float32 is the drift, reported by convert.
            groups = [(TorchRunner(self.deploy, spec, name=quantized_reference_name(self.deploy)),
                       candidates_for(self.exports, io_spec=spec)
                       + device_candidates(self.exports, self.devices))]
        else:
            groups = [(train, candidates_for(self.exports, deploy_model=self.deploy,
                                             io_spec=spec)
                       + device_candidates(self.exports, self.devices))]
        report = attach_on_device(
            merge_reports([validate(reference, candidates, spec, batches=(1, 3),
                                    seed=self.o.seed, progress=lambda s: self.progress(f"    {s}"))
                           for reference, candidates in groups]),
            self.devices, [c for _, candidates in groups for c in candidates])
        section = report.to_markdown()
        if precision == "int8":
            from export.quantize_onnx import int8_cpu_note

            section += f"- {int8_cpu_note(self.o.reduce_range)}\n"
        data["validation"] = report.to_dict()
        if self.loaded.zoo_name in DIGITS_MODELS:
            from odconv_deploy.digits import load_digits_test

            test = load_digits_test(self.loaded.zoo_name)
            deploy_name = (quantized_reference_name(self.deploy) if quantized
                           else "torch (deploy form)")
            rows = accuracy_table(train, candidates_for(self.exports, deploy_model=self.deploy,
                                                        io_spec=spec, deploy_name=deploy_name),
                                  test.images, test.labels, batch=8)
            data["accuracy"] = [asdict(r) for r in rows]
            table = markdown_table(
                ["runner", "accuracy", "agreement with float32 PyTorch", "note"],
                [(r.runner, "-" if r.accuracy is None else f"{r.accuracy:.4f}",
                  "-" if r.agreement is None else f"{r.agreement:.4f}",
                  f"skipped: {r.skipped}" if r.skipped else "") for r in rows])
            section += (f"\n### Test accuracy (sklearn digits, {len(test.images)} images)\n\n"
                        + "\n".join(table))
        self.report.sections["Validation"] = section
        checks = len(report.comparisons)
        failed = [f"{c.runner} b{c.batch}" for c in report.comparisons if not c]
        detail = (f"{checks - len(failed)}/{checks} comparisons passed"
                  + (f"; {len(report.skipped)} runner(s) skipped (see report)"
                     if report.skipped else "")
                  + (f"; input issues: {report.input_issues}" if report.input_issues else ""))
        if failed or report.input_issues:
            return Status.FAILED, detail + f"; FAILED: {', '.join(failed)}", data
        return Status.OK, detail, data

    def routing(self) -> StepOutcome:
        from export.validation import routed_formats, routing_agreement

        report = routing_agreement(self.conversions, self.loaded.io_spec, self.out / "probes",
                                   formats=routed_formats(getattr(self, "exports", [])),
                                   seed=self.o.seed,
                                   progress=lambda s: self.progress(f"    {s}"))
        self.report.sections["Routing agreement"] = (
            report.to_markdown() + "\nDebug exports with every layer's probes as extra "
            "outputs: `probes/` (not for shipping).\n")
        data: dict[str, object] = {"routing": report.to_dict()}
        if report.status is Status.SKIPPED:
            return Status.SKIPPED, "; ".join(f"{r}: {why}" for r, why in report.skipped), data
        runs = len(report.runs)
        failed = [run for run in report.runs if not run.passed]
        detail = f"{runs - len(failed)}/{runs} runners agree in every ODConv layer" + (
            f"; {len(report.skipped)} runner(s) skipped (see report)" if report.skipped else "")
        if failed:
            where = ", ".join(f"{run.runner}: " + (run.error or (
                f"first diverging layer {run.first_diverging.layer}")) for run in failed)
            return Status.FAILED, f"{detail}; FAILED: {where}", data
        return Status.OK, detail, data

    def bench(self) -> StepOutcome:
        from runtime_bench.bench import BenchConfig, benchmark
        from runtime_bench.measure import MeasureSettings
        from runtime_bench.report import to_markdown, write_report

        settings = (MeasureSettings(warmup=2, iterations=5) if self.o.quick
                    else MeasureSettings(warmup=3, iterations=15))
        config = BenchConfig(formats=",".join(self.o.bench_formats), batches=(1,),
                             threads=(self.o.threads,), strategy=self.conversions.strategy,
                             settings=settings, out=str(self.out / "bench"),
                             overwrite=self.o.overwrite)
        report = benchmark(self.loaded, config, conversions=self.conversions,
                           reuse=self.exports, calibration=self.calibration,
                           reduce_range=self.o.reduce_range, devices=self.devices,
                           progress=lambda s: self.progress(f"    {s}"))
        write_report(report, self.out / "bench", overwrite=True)
        self.report.sections["Latency"] = (to_markdown(report) + "\n![latency](bench/latency.png)"
                                           "\n![ratio](bench/ratio.png)\n")
        ratios = [f"{r.format} {r.ratio_to_static['ratio_median']:.2f}x"
                  for r in report.rows if r.role == "odconv" and r.ratio_to_static]
        failed = [f"{r.format}" for r in report.rows if r.status is Status.FAILED]
        data = {"rows": [asdict(r) for r in report.rows]}
        fixed = self._bench_fixed_batch1(settings)
        if fixed is not None:
            data["fixed_batch1_rows"] = [asdict(r) for r in fixed.rows]
            failed += [f"{r.format} (fixed batch 1)" for r in fixed.rows
                       if r.status is Status.FAILED]
            ratios += [f"{r.format} fixed batch 1 {fixed.config.strategy} "
                       f"{r.ratio_to_static['ratio_median']:.2f}x"
                       for r in fixed.rows if r.role == "odconv" and r.ratio_to_static]
        if failed:
            return Status.FAILED, f"failed on {', '.join(sorted(set(failed)))}", data
        return Status.OK, "ratio to static twin: " + (", ".join(ratios) or "-"), data


    def _bench_fixed_batch1(self, settings: object) -> object | None:
        """What a user would ship: batch 1 baked in, each layer's form chosen for its runtime.

        The run's strategy where it chooses per layer (``auto``, ``tune``), else ``auto``;
        benchmarked beside the fixed-batch static twin, in its own section and folder.
        """
        from runtime_bench.bench import BenchConfig, benchmark
        from runtime_bench.bench_formats import parse_bench_formats
        from runtime_bench.report import to_markdown, write_report

        timed = [b for b in parse_bench_formats(",".join(self.o.bench_formats))
                 if b.artifact is not None]
        if not timed:
            return None
        conversions = self.conversions
        if conversions.strategy not in (AUTO_STRATEGY, TUNE_STRATEGY):
            conversions = Conversions(self.loaded.model, AUTO_STRATEGY,
                                      progress=lambda s: self.progress(f"    {s}"),
                                      precision=self.o.precision)
        if conversions.strategy == TUNE_STRATEGY:
            from runtime_bench.tune import tune_for_formats

            tune_for_formats(conversions, self.loaded.io_spec, [b.artifact for b in timed],
                             onnx_target="onnxruntime", dynamic_batch=False,
                             progress=lambda s: self.progress(f"    {s}"))
        folder = self.out / "bench" / "fixed_batch1"
        config = BenchConfig(formats=",".join(b.name for b in timed), batches=(1,),
                             threads=(self.o.threads,), strategy=conversions.strategy,
                             dynamic_batch=False, settings=settings, out=str(folder),
                             overwrite=self.o.overwrite)
        report = benchmark(self.loaded, config, conversions=conversions,
                           calibration=self.calibration, reduce_range=self.o.reduce_range,
                           progress=lambda s: self.progress(f"    {s}"))
        write_report(report, folder, overwrite=True)
        self.report.sections["Latency, fixed batch 1 (what you would ship)"] = (
            f"Batch 1 baked into both graphs; each ODConv layer's form chosen for its runtime "
            f"(strategy `{conversions.strategy}`). The headline ratio of a batch-1 deployment."
            "\n\n" + to_markdown(report)
            + "\n![ratio](bench/fixed_batch1/ratio.png)\n")
        return report


def _as_tuple(value: object) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def run_pipeline(options: PipelineOptions, *,
                 progress: Callable[[str], None] = lambda _: None) -> PipelineReport:
    """Run the main job and write ``report.md``, ``report.json``, plots and artifacts."""
    check_writable(Path(options.out) / "report.json", overwrite=options.overwrite)
    run = _Pipeline(options, progress)
    run.step("load", run.load)
    run.step("convert", run.convert, needs=("load",))
    run.step("export", run.export, needs=("convert",))
    run.step("validate", run.validate, needs=("convert",))
    run.step("routing", run.routing, needs=("convert",))
    run.step("benchmark", run.bench, needs=("load",))
    return run.report
