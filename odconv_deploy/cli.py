"""Command-line interface: ``odconv-deploy {models,convert,export,validate,bench,run,device}``.

A thin layer over the API. Every command checks its arguments and its output paths before
any long work starts. Third-party chatter goes to a log file in the output folder (``-v``
shows it instead); the terminal gets the tool's progress lines and a short summary.

Exit codes: 0 success; 1 a check failed (an export, a validation or a benchmark cell); 2 a
usage error (unknown flag, malformed value); 3 a user error caught before or during the work
(unknown model, unreadable file, unwritable output, ...), with a message that says what was
received and what to do; 4 an internal error (a bug: the traceback is printed, please report).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from odconv_deploy.console import Console
from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.layers.deploy import DEFAULT_STRATEGY, DEPLOY_STRATEGIES
from odconv_deploy.status import Status
from odconv_deploy.strategy_choice import (
    AUTO_STRATEGY,
    AUTO_TARGETS,
    DEPRECATED_TARGETS,
    TUNE_STRATEGY,
)

if TYPE_CHECKING:  # the commands import their heavy modules lazily
    from export.result import ExportResult
    from odconv_deploy.io_spec import IOSpec
    from odconv_deploy.validation.golden import Golden
    from odconv_deploy.validation.validate import ValidationReport

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_USER_ERROR, EXIT_INTERNAL = 0, 1, 2, 3, 4
#: Name of the log file third-party output goes to, in the command's output folder.
LOG_NAME = "odconv-deploy.log"
#: Formats exported by default (the format table's order).
DEFAULT_FORMATS = "onnx,onnx-sim,ort,coreml,pte"
#: What ``bench`` and ``run`` time by default (ONNX Runtime on the simplified ONNX, ExecuTorch,
#: PyTorch eager).
DEFAULT_BENCH_FORMATS = "onnx-sim,pte,torch"


# -- argument types: a malformed value is a usage error (exit 2) -----------------------------
def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _warn_deprecated(old: str, new: str) -> None:
    print(f"odconv-deploy: warning: {old} is deprecated and will be removed in the next "
          f"release; use {new}", file=sys.stderr)


def _deprecated(new: str, convert: Callable[[object], object] = lambda v: v
                ) -> type[argparse.Action]:
    """An old flag that still works for one release, with a message naming the new one.

    ``convert`` turns the old value into the new flag's (e.g. renamed names); a flag without
    a value (``nargs=0``) stores its ``const``.
    """
    class Deprecated(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                     values: object, option_string: str | None = None) -> None:
            _warn_deprecated(str(option_string), new)
            setattr(namespace, self.dest, self.const if self.nargs == 0 else convert(values))
    return Deprecated


def _renamed_choice(renamed: dict[str, str], flag: str) -> Callable[[str], str]:
    """A choice whose old spellings still work for one release, with a message."""
    def parse(text: str) -> str:
        if text in renamed:
            _warn_deprecated(f"{flag} {text}", f"{flag} {renamed[text]}")
            return renamed[text]
        return text
    return parse


def _positive_int_list(text: str) -> list[int]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8, got {text!r}")
    return [_positive_int(t) for t in items]


# -- shared pieces of the commands -----------------------------------------------------------
def _resolve_batch_mode(args: argparse.Namespace) -> None:
    """Set ``args.dynamic_batch`` and ``args.fixed_batch`` from ``--fixed-batch N``.

    The deprecated ``--static-batch`` takes N from ``--batch-size`` (bench: its first
    ``--batch``), else 1.
    """
    if not hasattr(args, "fixed_batch"):
        return
    old_size = getattr(args, "batch_size", None)
    if args.fixed_batch is None and getattr(args, "static_batch", False):
        bench_batches = getattr(args, "batch", None) if args.command == "bench" else None
        args.fixed_batch = old_size or (bench_batches[0] if bench_batches else 1)
    elif args.fixed_batch is None and old_size is not None:
        raise ODConvDeployError(f"--batch-size {old_size} fixes the batch, but the batch is "
                                f"dynamic. Note: use --fixed-batch {old_size}.")
    elif args.fixed_batch is not None and old_size not in (None, args.fixed_batch):
        raise ODConvDeployError(f"--fixed-batch {args.fixed_batch} and --batch-size {old_size} "
                                "disagree. Note: give --fixed-batch N alone.")
    args.dynamic_batch = args.fixed_batch is None
    if args.fixed_batch is None:
        args.fixed_batch = 1


def _load(args: argparse.Namespace, console: Console) -> object:
    from odconv_deploy.model_source import load_model

    console.progress(f"-> load {args.model} ...")
    return load_model(args.model, checkpoint=args.checkpoint, kernel_num=args.kernel_num,
                      model_args=args.model_args, input_shape=args.input_shape,
                      trust_pickle=args.trust_pickle)


def _conversions(args: argparse.Namespace, loaded: object, console: Console) -> object:
    """The run's conversions: ``--strategy``, else a deploy checkpoint's own, else the default."""
    from odconv_deploy.conversions import Conversions

    stored = loaded.conversion
    strategy = args.strategy or (stored[0].strategy if stored else DEFAULT_STRATEGY)
    return Conversions(loaded.model, strategy, stored=stored,
                       progress=lambda s: console.progress(f"-> {s}"),
                       precision=getattr(args, "precision", "fp32"))


def _tune(conversions: object, loaded: object, console: Console, formats: Sequence[object], *,
          onnx_target: str, dynamic_batch: bool, batch_size: int | None,
          out: str | Path | None, devices: Sequence[object] = (),
          targets: Sequence[str] = ()) -> None:
    """``--strategy tune``: time each layer's forms for the targets of ``formats``, ``targets``.

    Timed on the first real device given, else here; the plans are printed and kept in
    ``out/tuning.json``.
    """
    if conversions.strategy != TUNE_STRATEGY:
        return
    from export.formats import FORMATS
    from odconv_deploy._atomic import atomic_output
    from runtime_bench.tune import tune_for_targets

    device = next((d for d in devices if not d.emulated and d.check().ok), None)
    plans = tune_for_targets(
        conversions, loaded.io_spec,
        [*(FORMATS[f].auto_target(onnx_target) for f in formats), *targets],
        dynamic_batch=dynamic_batch, batch_size=batch_size or 1, device=device,
        progress=lambda s: console.progress(f"-> {s}"))
    for plan in plans:
        console.info(plan.to_markdown())
    if out is not None:
        with atomic_output(Path(out) / "tuning.json", overwrite=True) as path:
            path.write_text(json.dumps([p.to_dict() for p in plans], indent=2))


def _check_calibration_args(args: argparse.Namespace, *, exports: bool = True) -> None:
    """Check int8's options before any work.

    The flags need int8, the folder its files, and a zoo model without built-in calibration
    data needs --calibration when the command ``exports`` (validating given artifacts
    does not).
    """
    from odconv_deploy.calibration import calibration_files, require_builtin_calibration
    from odconv_deploy.model_source import zoo_names

    if args.precision != "int8":
        for flag, value in (("--calibration", args.calibration),
                            ("--int8-reduce-range", args.int8_reduce_range)):
            if value:
                raise ODConvDeployError(f"{flag} is for --precision int8 (got --precision "
                                        f"{args.precision}). Note: drop it, or pass "
                                        "--precision int8.")
    elif args.calibration:
        calibration_files(args.calibration)
    elif exports and args.model in zoo_names():
        require_builtin_calibration(args.model)


def _calibration(args: argparse.Namespace, loaded: object, console: Console) -> object:
    """int8's calibration set (None for other precisions), read before any export."""
    from odconv_deploy.calibration import resolve_calibration

    calibration = resolve_calibration(args.precision, args.calibration, loaded.io_spec,
                                      zoo_name=loaded.zoo_name)
    if calibration is not None:
        console.progress(f"-> int8 calibration: {calibration.describe()}")
    return calibration


def _formats_for_precision(text: str, default: str, precision: str, console: Console) -> str:
    """The default format list cut to those ``precision`` is made for.

    A list the user gave is kept: a format in it that cannot take the precision is refused.
    """
    from export.formats import format_info

    if text != default:
        return text
    names = [n for n in default.split(",")
             if n == "torch" or precision in format_info(n).precisions]
    if len(names) < len(default.split(",")):
        console.info(f"--precision {precision}: formats {','.join(names)} (the defaults that "
                     "take it)")
    return ",".join(names)


@contextlib.contextmanager
def _quiet(console: Console, folder: str | Path | None) -> Iterator[Path | None]:
    """Third-party output into ``folder/odconv-deploy.log``.

    Without a folder the log is a temporary file, which the caller removes when the command
    passes (a failed one keeps it, and names it).
    """
    if console.verbose:
        yield None
        return
    if folder is None:
        handle, name = tempfile.mkstemp(prefix="odconv-deploy-", suffix=".log")
        os.close(handle)
        log = Path(name)
    else:
        log = Path(folder) / LOG_NAME
    try:
        with console.capture(log) as path:
            yield path
    except BaseException:
        if folder is None and log.exists():
            console.error(f"odconv-deploy: third-party output of this run: {log}")
        raise


def _check_artifacts_writable(formats: list[object], out: str | Path, stem: str,
                              overwrite: bool) -> None:
    from export.formats import FORMATS, with_sources
    from odconv_deploy._atomic import check_writable

    for fmt in with_sources(formats):
        check_writable(FORMATS[fmt].path(Path(out), stem), overwrite=overwrite)


def _print_exports(console: Console, results: list[object]) -> None:
    for result in results:
        console.info(result.summary())
        for note in result.notes:
            console.info(f"          note: {note}")


# -- commands ----------------------------------------------------------------------------------
def _cmd_models(args: argparse.Namespace, console: Console) -> int:
    from odconv_deploy.complexity import measure_complexity
    from odconv_deploy.models import create_model, list_models, model_entry

    console.info(f"{'model':<22}{'kernel_num':>11}{'params':>12}{'MACs@224':>12}  static twin")
    for name in list_models():
        entry = model_entry(name)
        kwargs = {"kernel_num": args.kernel_num} if entry.is_odconv else {}
        c = measure_complexity(create_model(name, **kwargs))
        k = str(args.kernel_num) if entry.is_odconv else "-"
        console.info(f"{name:<22}{k:>11}{c.params / 1e6:>11.2f}M{c.macs / 1e9:>11.3f}G  "
                     f"{entry.static_twin if entry.is_odconv else '-'}")
    console.info("also: od_tinynet_digits and od_mobilenetv2_digits (trained on sklearn "
                 "digits), package.module:callable (--model-args), model files "
                 "(--trust-pickle for pickled modules)")
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace, console: Console) -> int:
    from odconv_deploy._atomic import check_writable
    from odconv_deploy.conversions import Conversions, save_deploy_checkpoint

    out = Path(args.out)
    check_writable(out, overwrite=args.overwrite)  # before any work
    with _quiet(console, out.parent) as log:
        loaded = _load(args, console)
        conversions = Conversions(loaded.model, args.strategy or DEFAULT_STRATEGY,
                                  progress=lambda s: console.progress(f"-> {s}"))
        _tune(conversions, loaded, console, [], onnx_target="onnx",
              dynamic_batch=args.dynamic_batch, batch_size=args.fixed_batch, out=None,
              targets=[args.target])
        result = conversions.get(args.target, args.dynamic_batch)
        save_deploy_checkpoint(out, loaded, result, target=args.target,
                               dynamic_batch=args.dynamic_batch, overwrite=args.overwrite)
    errors = [layer.max_abs_error for layer in result.layers if layer.max_abs_error is not None]
    console.info(f"converted {len(result.layers)} ODConv layers of {loaded.name} "
                 f"({loaded.weights}) to '{result.strategy}' {result.layer_forms}, folded "
                 f"{result.folded_bn_count} BatchNorms; worst float64 layer error "
                 f"{max(errors, default=0.0):.2e}; wrote {out}")
    console.info(f"use it with: odconv-deploy export --model {out} --out DIR"
                 + (f" (log: {log})" if log else ""))
    return EXIT_OK


def _cmd_export(args: argparse.Namespace, console: Console) -> int:
    from export import export_formats, parse_formats
    from export.formats import check_precision
    from export.prepare import check_batch_size

    check_batch_size(args.fixed_batch, args.dynamic_batch)  # before any work
    _check_calibration_args(args)
    formats = parse_formats(_formats_for_precision(args.formats, DEFAULT_FORMATS,
                                                   args.precision, console))
    check_precision(args.precision, formats)
    with _quiet(console, args.out) as log:
        loaded = _load(args, console)
        calibration = _calibration(args, loaded, console)
        _check_artifacts_writable(formats, args.out, loaded.name, args.overwrite)
        conversions = _conversions(args, loaded, console)
        _tune(conversions, loaded, console, formats, onnx_target=args.onnx_target,
              dynamic_batch=args.dynamic_batch, batch_size=args.fixed_batch, out=args.out)
        results = export_formats(
            loaded.model, args.out, formats, stem=loaded.name,
            conversions=conversions, io_spec=loaded.io_spec,
            opset=args.opset, coreml_precision=args.coreml_precision, precision=args.precision,
            dynamic_batch=args.dynamic_batch, batch_size=args.fixed_batch,
            onnx_target=args.onnx_target, overwrite=args.overwrite, calibration=calibration,
            reduce_range=args.int8_reduce_range,
            progress=lambda step: console.progress(f"-> {step} ..."))
    _print_exports(console, results)
    failed = [r.format.value for r in results if not r.ok]
    verdict = f"export FAILED: {', '.join(failed)}" if failed else "export done"
    console.info(verdict + (f" (log: {log})" if log else ""))
    return EXIT_CHECK_FAILED if failed else EXIT_OK


def _cmd_validate(args: argparse.Namespace, console: Console) -> int:
    from export import ExportFormat, artifact_result, export_formats, parse_formats
    from export.formats import check_precision
    from export.prepare import check_batch_size
    from export.validation import routed_formats, routing_agreement, validate_artifacts
    from odconv_deploy._atomic import atomic_output, check_writable

    check_batch_size(args.fixed_batch, args.dynamic_batch)  # before any work
    given = [(fmt, p) for fmt, p in ((ExportFormat.ONNX, args.onnx), (ExportFormat.ORT, args.ort),
                                      (ExportFormat.EXECUTORCH, args.pte),
                                      (ExportFormat.COREML, args.coreml)) if p]
    _check_calibration_args(args, exports=not given)
    formats = parse_formats(_formats_for_precision(args.formats, DEFAULT_FORMATS,
                                                   args.precision, console))
    check_precision(args.precision, [fmt for fmt, _ in given] or formats)
    if args.json:
        check_writable(Path(args.json), overwrite=True)
    if args.images and not Path(args.images).is_dir():
        raise ODConvDeployError(f"--images {args.images!r} is not a folder. Note: pass a folder "
                                "of .png/.jpg images.")
    for _, path in given:
        if not Path(path).exists():
            raise ODConvDeployError(f"Artifact {path} does not exist.")
    batches = args.batch or ([1, 3] if args.dynamic_batch else [args.fixed_batch])
    golden = _golden_before_work(args)
    devices = _devices(args, console)
    with tempfile.TemporaryDirectory(prefix="odconv_validate_") as tmp, \
            _quiet(console, args.out) as log:
        loaded = _load(args, console)
        conversions = _conversions(args, loaded, console)
        if given:
            results = [artifact_result(fmt, path, loaded.io_spec,
                                       dynamic_batch=args.dynamic_batch)
                       for fmt, path in given]
            _check_recorded_weights(results, args.precision)
        else:
            if args.out:
                _check_artifacts_writable(formats, args.out, loaded.name, args.overwrite)
            _tune(conversions, loaded, console, formats, onnx_target=args.onnx_target,
                  dynamic_batch=args.dynamic_batch, batch_size=args.fixed_batch,
                  out=args.out, devices=devices)
            results = export_formats(loaded.model, args.out or tmp, formats, stem=loaded.name,
                                     conversions=conversions, io_spec=loaded.io_spec,
                                     precision=args.precision,
                                     calibration=_calibration(args, loaded, console),
                                     reduce_range=args.int8_reduce_range,
                                     dynamic_batch=args.dynamic_batch,
                                     batch_size=args.fixed_batch, onnx_target=args.onnx_target,
                                     overwrite=args.overwrite,
                                     progress=lambda s: console.progress(f"-> {s} ..."))
            _print_exports(console, results)
        deploy = conversions.get("torch")
        report = validate_artifacts(loaded.model, results, io_spec=loaded.io_spec,
                                    deploy_model=deploy.model, batches=batches, seed=args.seed,
                                    image_folder=args.images,
                                    quantized=deploy.float_model is not None,
                                    int8=args.precision == "int8", devices=devices,
                                    progress=lambda s: console.progress(f"-> {s} ..."))
        routing = None
        if not given and not args.no_routing:
            routing = routing_agreement(
                conversions, loaded.io_spec, Path(args.out or tmp) / "probes",
                formats=routed_formats(results),
                dynamic_batch=args.dynamic_batch, batch_size=args.fixed_batch,
                onnx_target=args.onnx_target, seed=args.seed,
                progress=lambda s: console.progress(f"-> {s} ..."))
        golden_report = _golden_step(args, loaded.io_spec, results, batches, golden, console)
    console.info(report.to_markdown())
    if args.precision == "int8":
        from export.quantize_onnx import int8_cpu_note

        console.info(int8_cpu_note(args.int8_reduce_range))
    if golden_report is not None:
        console.info(f"Against the golden outputs in {args.golden}:\n"
                     + golden_report.to_markdown())
    if routing is not None:
        console.info(routing.to_markdown())
    elif given:
        console.info("routing agreement: not checked (it exports the model again with every "
                     "layer's probes; run validate without --onnx/--ort/--pte/--coreml for it)")
    if args.json:
        data = {**report.to_dict(), "routing": None if routing is None else routing.to_dict(),
                "golden": None if golden_report is None else golden_report.to_dict()}
        with atomic_output(args.json, overwrite=True) as path:
            path.write_text(json.dumps(data, indent=2, default=str))
    failed_exports = [r for r in results if not r.ok]
    ok = (report.passed and not failed_exports and (routing is None or routing.passed)
          and (golden_report is None or golden_report.passed))
    if ok and log is not None and args.out is None:
        log.unlink(missing_ok=True)  # a temporary log: a passing run leaves nothing behind
        log = None
    console.info(f"validation {'PASSED' if ok else 'FAILED'}" + (f" (log: {log})" if log else ""))
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def _check_recorded_weights(results: list[ExportResult], precision: str) -> None:
    """Refuse artifacts whose recorded weight storage is not the one ``precision`` checks."""
    expected = precision if precision in ("int8w", "int8", "lut6w") else "float"
    for r in results:
        recorded = r.options.get("weights")
        if recorded is not None and recorded != expected:
            hint = (f"--precision {recorded}" if recorded in ("int8w", "int8", "lut6w")
                    else "the --precision it was exported with")
            raise ODConvDeployError(
                f"{r.path} stores {recorded} weights (its metadata); --precision {precision} "
                f"checks {expected} ones. Note: pass {hint}.")


def _golden_before_work(args: argparse.Namespace) -> Golden | None:
    """Check --record-golden / --golden before any work; the golden read for --golden."""
    from odconv_deploy._atomic import check_writable
    from odconv_deploy.runners import coreml_predict_available
    from odconv_deploy.validation.golden import GoldenError, check_golden_artifact, read_golden

    for flag, value in (("--record-golden", args.record_golden), ("--golden", args.golden)):
        if value and not args.coreml:
            raise GoldenError(f"{flag} needs the Core ML artifact it is for. Note: pass "
                              f"--coreml M.mlpackage with {flag} {value}.")
    if args.record_golden:
        available, why = coreml_predict_available()
        if not available:
            raise GoldenError(f"--record-golden records Core ML predict's outputs, and {why}. "
                              "Note: record on a Mac, then check on any machine with --golden "
                              f"{args.record_golden}.")
        check_writable(Path(args.record_golden), overwrite=args.overwrite)
    if not args.golden:
        return None
    golden = read_golden(args.golden)
    check_golden_artifact(golden, args.coreml)
    return golden


def _golden_step(args: argparse.Namespace, io_spec: IOSpec, results: list[ExportResult],
                 batches: list[int], golden: Golden | None, console: Console
                 ) -> ValidationReport | None:
    """Record golden outputs (--record-golden), or check against them (--golden)."""
    from export import ExportFormat
    from export.validation import check_against_golden
    from odconv_deploy.runners import CoreMLRunner
    from odconv_deploy.validation.golden import record_golden, write_golden
    from odconv_deploy.validation.inputs import validation_feeds

    if not (args.record_golden or golden):
        return None
    (coreml,) = [r for r in results if r.format is ExportFormat.COREML]
    if args.record_golden:
        import platform

        import coremltools

        feeds = validation_feeds(io_spec, batches, seed=args.seed, image_folder=args.images)
        recorded = record_golden(
            CoreMLRunner(coreml.path, name="coreml (predict)"), feeds, str(coreml.path),
            precision=str(coreml.options.get("precision", "fp16")),
            environment={"platform": platform.platform(), "coremltools": coremltools.__version__})
        write_golden(recorded, args.record_golden, overwrite=args.overwrite)
        console.info(f"golden outputs of {recorded.producer} at batches {recorded.batches} "
                     f"written to {args.record_golden}")
    if golden is None:
        return None
    return check_against_golden(golden, coreml, classifier=io_spec.task == "classification",
                                progress=lambda s: console.progress(f"-> golden: {s} ..."))


def _cmd_bench(args: argparse.Namespace, console: Console) -> int:
    from export.formats import check_precision
    from odconv_deploy._atomic import OutputPathError
    from runtime_bench.bench import BenchConfig, benchmark
    from runtime_bench.bench_formats import parse_bench_formats
    from runtime_bench.measure import MeasureSettings
    from runtime_bench.report import check_report_writable, to_markdown, write_report

    _check_calibration_args(args)
    args.formats = _formats_for_precision(args.formats, DEFAULT_BENCH_FORMATS, args.precision,
                                          console)
    check_precision(args.precision, _bench_artifacts(parse_bench_formats(args.formats)))
    check_report_writable(args.out, overwrite=args.overwrite)
    artifacts = Path(args.out) / "artifacts"
    if artifacts.is_dir() and any(artifacts.iterdir()) and not args.overwrite:
        raise OutputPathError(f"{artifacts} already holds artifacts. Note: pass --overwrite to "
                              "replace them, or choose another --out.")
    if args.resolution and args.input_shape:
        raise ODConvDeployError("Give --input-shape or --resolution, not both.")
    settings = MeasureSettings(warmup=args.warmup, iterations=args.iterations,
                               budget_s=args.budget, fresh_process=args.fresh_process)
    devices = _devices(args, console)
    with _quiet(console, args.out) as log:
        if args.resolution:
            args.input_shape = _square_input(args, console, args.resolution)
        loaded = _load(args, console)
        conversions = _conversions(args, loaded, console)
        _tune(conversions, loaded, console, _bench_artifacts(parse_bench_formats(args.formats)),
              onnx_target="onnxruntime", dynamic_batch=args.dynamic_batch,
              batch_size=_bench_batches(args)[0], out=args.out, devices=devices)
        config = BenchConfig(
            formats=args.formats, batches=_bench_batches(args), threads=args.threads,
            strategy=conversions.strategy, dynamic_batch=args.dynamic_batch,
            settings=settings, out=args.out, overwrite=args.overwrite)
        report = benchmark(loaded, config, conversions=conversions,
                           calibration=_calibration(args, loaded, console),
                           reduce_range=args.int8_reduce_range, devices=devices,
                           progress=lambda s: console.progress(f"-> {s}"))
        files = write_report(report, args.out, overwrite=args.overwrite)
    console.info(to_markdown(report))
    console.info("wrote " + ", ".join(str(f) for f in files) + (f" (log: {log})" if log else ""))
    return EXIT_OK if all(r.status is not Status.FAILED for r in report.rows) else EXIT_CHECK_FAILED


def _bench_batches(args: argparse.Namespace) -> list[int]:
    """``--batch`` (default 1); with a fixed batch N first (it is baked, the others skipped)."""
    if args.dynamic_batch:
        return args.batch or [1]
    return [args.fixed_batch, *(b for b in args.batch or [] if b != args.fixed_batch)]


def _square_input(args: argparse.Namespace, console: Console, size: int) -> str:
    """``--resolution N``: the model's own input at N x N."""
    from odconv_deploy.model_source import load_model

    spec = load_model(args.model, checkpoint=args.checkpoint, kernel_num=args.kernel_num,
                      model_args=args.model_args, trust_pickle=args.trust_pickle).io_spec
    if len(spec.inputs) != 1 or len(spec.inputs[0].shape) != 4:
        raise ODConvDeployError("--resolution needs a model with one image input. Note: "
                                "use --input-shape.")
    return ",".join(map(str, (1, spec.inputs[0].shape[1], size, size)))


def _bench_artifacts(bench_formats: list[object]) -> list[object]:
    """The export formats the benchmark of ``bench_formats`` makes (PyTorch makes none)."""
    return [b.artifact for b in bench_formats if b.artifact is not None]


def _cmd_run(args: argparse.Namespace, console: Console) -> int:
    from export import parse_formats
    from export.formats import check_precision
    from odconv_deploy._atomic import check_writable
    from odconv_deploy.pipeline import PipelineOptions, run_pipeline
    from runtime_bench.bench_formats import parse_bench_formats

    _check_calibration_args(args)  # before any work
    formats = parse_formats(_formats_for_precision(args.formats, DEFAULT_FORMATS,
                                                   args.precision, console))
    bench_formats = parse_bench_formats(_formats_for_precision(
        args.bench_formats, DEFAULT_BENCH_FORMATS, args.precision, console))
    check_precision(args.precision, formats + _bench_artifacts(bench_formats))
    check_writable(Path(args.out) / "report.json", overwrite=args.overwrite)
    _devices(args, console)  # a malformed one is refused here; a failing one is reported
    options = PipelineOptions(
        model=args.model, kernel_num=args.kernel_num, checkpoint=args.checkpoint,
        model_args=args.model_args, input_shape=args.input_shape,
        trust_pickle=args.trust_pickle, strategy=args.strategy, precision=args.precision,
        calibration=args.calibration, reduce_range=args.int8_reduce_range, out=args.out,
        overwrite=args.overwrite, quick=args.quick,
        formats=tuple(f.value for f in formats),
        bench_formats=tuple(b.name for b in bench_formats),
        threads=args.threads, devices=tuple(dict.fromkeys(args.device or [])))
    with _quiet(console, args.out) as log:
        report = run_pipeline(options, progress=console.progress)
    console.info(report.summary() + (f"\nlog: {log}" if log else ""))
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED


def _devices(args: argparse.Namespace, console: Console) -> list[object]:
    """The ``--device`` values as devices, each checked (before any long work).

    A malformed or unknown device is a user error; one that is unreachable or lacks a
    runtime is said here and becomes that device's failures in the report.
    """
    from odconv_deploy.devices import parse_device

    devices = [parse_device(spec) for spec in dict.fromkeys(args.device or [])]
    for device in devices:
        console.progress(f"-> check device {device.name} ...")
        console.info(_device_line(device.check()))
    return devices


def _device_line(check: object) -> str:
    cpu = check.details.get("cpu") or {}
    head = f"device {check.device}: " + ("ok" if check.ok else "FAILED: " + "; ".join(
        check.problems or ["no runtime"]))
    facts = [f"CPU {cpu.get('model', '?')} ({' '.join(cpu.get('features', [])) or '-'})"
             if cpu else None,
             ", ".join(f"{k} {v}" for k, v in check.runtimes.items()) or None,
             *(f"{k} missing: {v}" for k, v in check.missing.items())]
    if check.details.get("emulated"):
        facts.append("emulated: numerics only, no latency")
    return head + "".join(f"; {f}" for f in facts if f)


def _cmd_device(args: argparse.Namespace, console: Console) -> int:
    from odconv_deploy.devices import ARM64_CPUS, DEFAULT_CPU, PLANNED, parse_device
    from odconv_deploy.devices.provision import (
        arm64_layout,
        cache_root,
        ensure_host_bundle,
        folder_bytes,
        setup_arm64,
    )

    if args.action == "list":
        layout = arm64_layout()
        missing = layout.missing()
        state = (f"set up in {layout.root} ({folder_bytes(layout.root) / 1e6:.0f} MB)"
                 if not missing else f"not set up (missing: {', '.join(missing)}; run "
                 "'odconv-deploy device setup arm64-emu')")
        console.info("host: this machine, through the device runners")
        console.info(f"arm64-emu[:CPU]: an emulated ARM64 core under QEMU, numerics only; "
                     f"{state}")
        for cpu, what in ARM64_CPUS.items():
            console.info(f"  {cpu}{' (default)' if cpu == DEFAULT_CPU else ''}: {what}")
        console.info("ssh://user@host[:port][?key=PATH&python=PATH&workdir=PATH&known_hosts="
                     "PATH]: an x86-64 or aarch64 Linux machine")
        for kind, why in PLANNED.items():
            console.info(f"{kind}: {why}")
        console.info(f"cache: {cache_root()} ($ODCONV_DEPLOY_CACHE)")
        return EXIT_OK
    devices = [parse_device(spec) for spec in args.devices or ["arm64-emu"]]
    ok = True
    for device in devices:
        if args.action == "setup":
            if device.kind == "arm64-emu":
                report = setup_arm64(progress=lambda s: console.progress(f"-> {s} ..."))
                for part, how in report.parts.items():
                    console.info(f"made {part}: {how}")
                for part, why in report.failures.items():
                    console.info(f"could not make {part}: {why}")
                console.info(f"arm64-emu uses {report.disk_bytes / 1e6:.0f} MB in "
                             f"{arm64_layout().root}" + ("" if report.parts else
                                                          " (already set up)"))
            elif device.kind == "host":
                console.info(f"host: ExecuTorch runner in {ensure_host_bundle()}")
        console.progress(f"-> check device {device.name} ...")
        check = device.check(refresh=True)
        console.info(_device_line(check))
        ok &= check.ok
    return EXIT_OK if ok else EXIT_CHECK_FAILED


# -- the parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser (defaults are shown in ``--help``)."""
    from export.formats import FORMAT_NAMES
    from export.to_onnx import ONNX_TARGETS
    from odconv_deploy.quantize import PRECISIONS
    from runtime_bench.bench_formats import BENCH_FORMATS, renamed_backends

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="odconv-deploy", formatter_class=fmt,
        description="Deploy ODConv networks: exact conversion, export, validation, benchmarks.",
        epilog="exit codes: 0 ok, 1 a check failed, 2 usage error, 3 user error (bad model, "
               "file or output path), 4 internal error")
    sub = parser.add_subparsers(dest="command", required=True)
    formats_help = f"comma-separated: {', '.join(FORMAT_NAMES)}"

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-v", "--verbose", action="store_true",
                       help="show third-party output instead of logging it")

    p = sub.add_parser("models", help="list the model zoo with params and MACs",
                       formatter_class=fmt)
    p.add_argument("--kernel-num", type=_positive_int, default=1,
                   help="kernel_num of the ODConv models")
    common(p)
    p.set_defaults(func=_cmd_models)

    def model_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
        p.add_argument("--model", default=default_model, required=default_model is None,
                       help="zoo name ('odconv-deploy models'), package.module:callable, or a "
                       "model file (torch.save'd module, checkpoint with 'model'/'ema', or "
                       "'odconv-deploy convert' output)")
        p.add_argument("--model-args", default=None,
                       help="arguments of the zoo builder or the callable: key=value,...")
        p.add_argument("--kernel-num", type=_positive_int, default=None,
                       help="ODConv kernel_num of a zoo model (default 4)")
        p.add_argument("--checkpoint", default=None,
                       help="state_dict to load (default: deterministic synthetic weights for "
                       "zoo models)")
        p.add_argument("--input-shape", nargs="+", default=None, metavar="SHAPE",
                       help="input shape, batch first (1,3,640,640); several inputs as "
                       "name:1,3,H,W name2:...; default: the model's own")
        p.add_argument("--trust-pickle", action="store_true",
                       help="allow loading a pickled nn.Module from --model (runs code from "
                       "the file)")
        p.add_argument("--strategy", default=None,
                       choices=sorted(DEPLOY_STRATEGIES) + [AUTO_STRATEGY, TUNE_STRATEGY],
                       help=f"deploy-form strategy (default: {DEFAULT_STRATEGY}, or a deploy "
                       "checkpoint's own); 'auto' chooses per layer for each format by fixed "
                       "rules; 'tune' times every exact form of each layer in the target "
                       "runtime and takes the fastest (cached per geometry, runtime, CPU)")
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        common(p)

    def batch_mode_args(p: argparse.ArgumentParser, help_text: str) -> None:
        """``--fixed-batch N``, and its 0.1 spellings (still accepted, with a warning)."""
        p.add_argument("--fixed-batch", type=_positive_int, default=None, metavar="N",
                       help=help_text)
        p.add_argument("--static-batch", nargs=0, const=True, default=False,
                       action=_deprecated("--fixed-batch N"), help=argparse.SUPPRESS)
        p.add_argument("--batch-size", type=_positive_int, default=None,
                       action=_deprecated("--fixed-batch N"), help=argparse.SUPPRESS)

    def precision_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                       help="what the artifacts store and compute in: " + "; ".join(
                           f"{k}: {v}" for k, v in PRECISIONS.items()))
        p.add_argument("--calibration", metavar="DIR", default=None,
                       help="int8: a folder of calibration images (read through the model's "
                       "preprocessing: resized, centre-cropped, normalised) or preprocessed "
                       ".npy arrays; a trained digits model defaults to its training split")
        p.add_argument("--int8-reduce-range", action="store_true",
                       help="int8: 7-bit weights, for x86 CPUs without VNNI (their U8S8 "
                       "kernels can saturate); ARM does not need it")

    def device_arg(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--device", action="append", default=None, metavar="DEVICE",
                       help=f"also {what} on this device (repeatable): host, arm64-emu[:CPU] "
                       "(emulated ARM64 core, numerics only), ssh://user@host[:port]; see "
                       "'odconv-deploy device list'")

    def exported_set_args(p: argparse.ArgumentParser) -> None:
        """Batch axis and ONNX target of the artifacts a command exports."""
        batch_mode_args(p, "bake batch N into the artifacts instead of a dynamic batch axis "
                        "(N other than 1: onnx, onnx-sim and ort only)")
        p.add_argument("--onnx-target", default="onnx", choices=ONNX_TARGETS,
                       type=_renamed_choice(DEPRECATED_TARGETS, "--onnx-target"),
                       help="onnx: graphs any runtime runs; onnxruntime: for ONNX Runtime CPU "
                       "on this machine (with --strategy auto and --fixed-batch, 3x3 and "
                       "depthwise layers run ORT's NCHWc kernels; a CPU with another NCHWc "
                       "block refuses the file)")

    p = sub.add_parser("convert", help="convert a model to its deploy form and save it",
                       formatter_class=fmt)
    model_args(p, None)
    p.add_argument("--out", required=True, help="output .pt file (a deploy checkpoint)")
    p.add_argument("--target", default="onnx", choices=AUTO_TARGETS,
                   type=_renamed_choice(DEPRECATED_TARGETS, "--target"),
                   help="the runtime --strategy auto chooses the layers' forms for")
    batch_mode_args(p, "the artifacts made from it will have batch N baked in (with "
                    "--strategy auto, forms that need a fixed batch become possible)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="export a model to ONNX, CoreML, ORT and ExecuTorch",
                       formatter_class=fmt)
    model_args(p, None)
    p.add_argument("--formats", default=DEFAULT_FORMATS, help=formats_help)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--opset", type=_positive_int, default=18, help="ONNX opset")
    p.add_argument("--coreml-precision", default="fp16", choices=["fp16", "fp32"],
                   help="CoreML compute precision")
    precision_arg(p)
    exported_set_args(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("validate", help="check exported artifacts against PyTorch on every "
                       "runtime that can run them", formatter_class=fmt)
    model_args(p, None)
    p.add_argument("--onnx", help="validate this ONNX model (instead of exporting)")
    p.add_argument("--ort", help="validate this .ort model")
    p.add_argument("--pte", help="validate this ExecuTorch program")
    p.add_argument("--coreml", help="validate this .mlpackage")
    p.add_argument("--formats", default=DEFAULT_FORMATS,
                   help="formats to export and validate when no artifact is given "
                   f"({formats_help})")
    p.add_argument("--out", default=None, help="keep exported artifacts here (default: temp)")
    p.add_argument("--batch", type=_positive_int_list, default=None,
                   help="batch sizes to compare (default: 1,3; with --static-batch the fixed "
                   "batch)")
    p.add_argument("--batches", type=_positive_int_list, dest="batch", help=argparse.SUPPRESS,
                   action=_deprecated("--batch"))
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the random inputs")
    p.add_argument("--images", default=None, help="folder of images to use as inputs")
    exported_set_args(p)
    p.add_argument("--no-routing", action="store_true",
                   help="skip the routing check (a second export of onnx/coreml/pte with every "
                   "ODConv layer's attentions and output as extra outputs, compared per layer)")
    p.add_argument("--record-golden", metavar="DIR", default=None,
                   help="with --coreml on macOS: store the inputs and Core ML predict's outputs "
                   "in DIR, to check the artifact anywhere later with --golden DIR")
    p.add_argument("--golden", metavar="DIR", default=None,
                   help="with --coreml: also check the MIL executor (and predict, where it "
                   "runs) against the outputs recorded in DIR")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    precision_arg(p)
    device_arg(p, "run the .ort (else .sim.onnx/.onnx) and .pte and compare them")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("bench", help="latency of a model beside its static twin",
                       formatter_class=fmt)
    model_args(p, None)
    p.add_argument("--formats", default=DEFAULT_BENCH_FORMATS,
                   help=f"what to time, comma-separated: {', '.join(BENCH_FORMATS)} (torch: "
                   "PyTorch eager)")
    p.add_argument("--backends", dest="formats", help=argparse.SUPPRESS,
                   action=_deprecated("--formats", renamed_backends))
    p.add_argument("--batch", type=_positive_int_list, default=None,
                   help="batch sizes, comma-separated (default 1; with --fixed-batch N: N)")
    p.add_argument("--threads", type=_positive_int_list, default=[1],
                   help="thread counts, comma-separated")
    p.add_argument("--resolution", type=_positive_int, default=None,
                   help="square input size of a one-image model (default: the model's; "
                   "see also --input-shape)")
    p.add_argument("--warmup", type=_non_negative_int, default=5,
                   help="warm-up runs per measurement")
    p.add_argument("--iterations", type=_positive_int, default=30,
                   help="timed runs per measurement")
    p.add_argument("--budget", type=_positive_float, default=None,
                   help="time budget per measurement in seconds (overrides --iterations)")
    p.add_argument("--out", default="bench_out", help="output folder")
    batch_mode_args(p, "bake batch N into the artifacts (other --batch sizes are skipped; N "
                    "other than 1: onnx-sim and ort only)")
    p.add_argument("--fresh-process", action="store_true",
                   help="measure each cell's latency, cold start and memory in a new process")
    precision_arg(p)
    device_arg(p, "time the onnx-sim, ort and pte artifacts (timed by the runtime there)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("run", help="the whole job: convert, export, validate, benchmark, report",
                       formatter_class=fmt)
    model_args(p, "od_resnet18")
    p.add_argument("--out", default="odconv_out", help="report directory")
    p.add_argument("--formats", default=DEFAULT_FORMATS, help=f"formats to export ({formats_help})")
    p.add_argument("--bench-formats", default=DEFAULT_BENCH_FORMATS,
                   help=f"what to benchmark ({', '.join(BENCH_FORMATS)})")
    p.add_argument("--backends", dest="bench_formats", help=argparse.SUPPRESS,
                   action=_deprecated("--bench-formats", renamed_backends))
    p.add_argument("--threads", type=_positive_int, default=1, help="threads for the benchmark")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    precision_arg(p)
    device_arg(p, "validate and benchmark the shipped artifacts")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("device", help="set up, list and check the devices artifacts run on",
                       formatter_class=fmt)
    p.add_argument("action", choices=["setup", "list", "check"],
                   help="setup: fetch and cache what a device needs (arm64-emu: QEMU, an arm64 "
                   "sysroot, the aarch64 runtimes) and check it; list: the device kinds; "
                   "check: reachable, runtimes, CPU")
    p.add_argument("devices", nargs="*", metavar="DEVICE",
                   help="host, arm64-emu[:CPU], ssh://user@host[:port] (default: arm64-emu)")
    common(p)
    p.set_defaults(func=_cmd_device)
    return parser


def _disk_full(exc: BaseException) -> OSError | None:
    """The out-of-space ``OSError`` behind ``exc`` (itself, or what it was raised from)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        current = current.__cause__ or current.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``odconv-deploy``; returns the exit code (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2); argparse said why
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    console = Console(verbose=args.verbose)
    command: Callable[[argparse.Namespace, Console], int] = args.func
    try:
        _resolve_batch_mode(args)
        return command(args, console)
    except ODConvDeployError as exc:
        console.error(f"odconv-deploy: error: {exc}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        console.error("odconv-deploy: interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - a full disk, else a bug: say so, with the traceback
        full = _disk_full(exc)
        if full is not None:  # the machine's state, not a bug
            where = f" writing {full.filename}" if full.filename else ""
            console.error(f"odconv-deploy: error: the disk is full ({full.strerror}{where}). "
                          "Outputs are written whole or not at all, so nothing partial was "
                          "kept. Free some space there, or choose another --out (and TMPDIR), "
                          "and run again.")
            return EXIT_USER_ERROR
        console.error("odconv-deploy: internal error (a bug; please report it with this "
                      "output):\n" + traceback.format_exc())
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
