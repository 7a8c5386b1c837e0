"""Command-line interface: ``odconv-deploy {models,convert,run}``. A thin layer over the API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.layers.deploy import DEFAULT_STRATEGY, DEPLOY_STRATEGIES
from odconv_deploy.strategy_choice import AUTO_STRATEGY, AUTO_TARGETS


def _cmd_models(args: argparse.Namespace) -> int:
    from odconv_deploy.complexity import measure_complexity
    from odconv_deploy.models import create_model, list_models, model_entry

    print(f"{'model':<22}{'kernel_num':>11}{'params':>12}{'MACs@224':>12}  static twin")
    for name in list_models():
        entry = model_entry(name)
        kwargs = {"kernel_num": args.kernel_num} if entry.is_odconv else {}
        c = measure_complexity(create_model(name, **kwargs))
        k = str(args.kernel_num) if entry.is_odconv else "-"
        print(f"{name:<22}{k:>11}{c.params / 1e6:>11.2f}M{c.macs / 1e9:>11.3f}G  "
              f"{entry.static_twin if entry.is_odconv else '-'}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch

    import odconv_deploy
    from export._common import nchwc_block_of
    from odconv_deploy._atomic import atomic_output
    from odconv_deploy.model_source import load_zoo_model
    from odconv_deploy.reparameterize import convert_model

    loaded = load_zoo_model(args.model, checkpoint=args.checkpoint, kernel_num=args.kernel_num)
    result = convert_model(loaded.model, strategy=args.strategy, target=args.target,
                           dynamic_batch=not args.static_batch)
    worst = max((layer.max_abs_error or 0.0) for layer in result.layers)
    with atomic_output(args.out, overwrite=args.overwrite) as tmp:
        torch.save({"state_dict": result.model.state_dict(), "model": args.model,
                    "kernel_num": args.kernel_num, "strategy": args.strategy,
                    "layer_strategies": result.layer_strategies,
                    # Which deploy class each layer needs to load this state_dict.
                    "layer_forms": {c.name: c.strategy for c in result.layers},
                    # The layout of ort_nchwc layers' weights (None: no such layer).
                    "nchwc_block": nchwc_block_of(result.model),
                    "odconv_deploy_version": odconv_deploy.__version__}, tmp)
    print(f"converted {len(result.layers)} ODConv layers of {args.model} ({loaded.weights}) "
          f"to '{args.strategy}' {result.layer_strategies}, folded {result.folded_bn_count} "
          f"BatchNorms; worst float64 layer error {worst:.2e}; wrote {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from export import export_formats, parse_formats
    from export._common import check_batch_size
    from odconv_deploy.model_source import load_zoo_model

    check_batch_size(args.batch_size, not args.static_batch)  # before any work
    formats = parse_formats(args.formats)
    loaded = load_zoo_model(args.model, checkpoint=args.checkpoint, kernel_num=args.kernel_num)
    results = export_formats(
        loaded.model, args.out, formats, stem=args.model, strategy=args.strategy,
        opset=args.opset, coreml_precision=args.coreml_precision,
        dynamic_batch=not args.static_batch, batch_size=args.batch_size,
        onnx_target=args.onnx_target, overwrite=args.overwrite,
        progress=lambda step: print(f"-> {step} ...", file=sys.stderr),
    )
    for result in results:
        print(result.summary())
        for note in result.notes:
            print(f"          note: {note}")
    return 0 if all(r.ok for r in results) else 1


def _cmd_validate(args: argparse.Namespace) -> int:
    import tempfile

    from export import ExportFormat, artifact_result, export_formats, parse_formats
    from export._common import check_batch_size
    from odconv_deploy.model_source import load_zoo_model
    from odconv_deploy.reparameterize import convert_model
    from odconv_deploy.validation.artifacts import validate_artifacts

    check_batch_size(args.batch_size, not args.static_batch)  # before any work
    kwargs = {} if args.model == "od_tinynet_digits" else {"kernel_num": args.kernel_num}
    loaded = load_zoo_model(args.model, checkpoint=args.checkpoint, **kwargs)
    given = [(fmt, p) for fmt, p in ((ExportFormat.ONNX, args.onnx), (ExportFormat.ORT, args.ort),
                                      (ExportFormat.EXECUTORCH, args.pte),
                                      (ExportFormat.COREML, args.coreml)) if p]
    deploy = convert_model(loaded.model, strategy=args.strategy, target="torch").model
    with tempfile.TemporaryDirectory(prefix="odconv_validate_") as tmp:
        if given:
            results = [artifact_result(fmt, path, loaded.io_spec, dynamic_batch=not
                                       args.static_batch) for fmt, path in given]
        else:
            results = export_formats(loaded.model, args.out or tmp,
                                     parse_formats(args.formats), stem=args.model,
                                     strategy=args.strategy, converted=deploy,
                                     io_spec=loaded.io_spec,
                                     dynamic_batch=not args.static_batch,
                                     batch_size=args.batch_size, onnx_target=args.onnx_target,
                                     overwrite=args.overwrite,
                                     progress=lambda s: print(f"-> {s} ...", file=sys.stderr))
            for r in results:
                print(r.summary())
        default = str(args.batch_size) if args.static_batch else "1,3"
        batches = [int(b) for b in (args.batches or default).split(",")]
        report = validate_artifacts(loaded.model, results, io_spec=loaded.io_spec,
                                    deploy_model=deploy, batches=batches, seed=args.seed,
                                    image_folder=args.images)
    print(report.to_markdown())
    if args.json:
        from odconv_deploy._atomic import atomic_output

        with atomic_output(args.json, overwrite=True) as path:
            path.write_text(report.to_json())
    failed_exports = [r for r in results if not r.ok]
    print("validation", "PASSED" if report.passed and not failed_exports else "FAILED")
    return 0 if report.passed and not failed_exports else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from runtime_bench.bench import BenchConfig, run_benchmark
    from runtime_bench.measure import MeasureSettings
    from runtime_bench.report import to_markdown, write_report

    settings = MeasureSettings(warmup=args.warmup, iterations=args.iterations,
                               budget_s=args.budget, fresh_process=args.fresh_process)
    config = BenchConfig(
        model=args.model, kernel_num=args.kernel_num, checkpoint=args.checkpoint,
        backends=args.backends, batches=[int(b) for b in args.batch.split(",")],
        threads=[int(t) for t in args.threads.split(",")], strategy=args.strategy,
        dynamic_batch=not args.static_batch, resolution=args.resolution, settings=settings,
        out=args.out, overwrite=args.overwrite)
    report = run_benchmark(config, progress=lambda s: print(s, file=sys.stderr))
    files = write_report(report, args.out, overwrite=args.overwrite)
    print(to_markdown(report))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0 if all(r.status != "failed" for r in report.rows) else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from odconv_deploy.pipeline import PipelineOptions, run_pipeline

    options = PipelineOptions(
        model=args.model, kernel_num=args.kernel_num, checkpoint=args.checkpoint,
        strategy=args.strategy, out=args.out, overwrite=args.overwrite, quick=args.quick,
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        threads=args.threads,
    )
    report = run_pipeline(options, progress=print)
    print(report.summary())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (defaults are shown in ``--help``)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="odconv-deploy", formatter_class=fmt,
        description="Deploy ODConv networks: exact conversion, export, validation, benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the model zoo with params and MACs",
                       formatter_class=fmt)
    p.add_argument("--kernel-num", type=int, default=1, help="kernel_num of the ODConv models")
    p.set_defaults(func=_cmd_models)

    def model_args(p: argparse.ArgumentParser, default_model: str | None, default_k: int) -> None:
        p.add_argument("--model", default=default_model, required=default_model is None,
                       help="zoo model name (see 'odconv-deploy models')")
        p.add_argument("--kernel-num", type=int, default=default_k, help="ODConv kernel_num")
        p.add_argument("--checkpoint", default=None,
                       help="checkpoint to load (default: deterministic synthetic weights)")
        p.add_argument("--strategy", default=DEFAULT_STRATEGY,
                       choices=sorted(DEPLOY_STRATEGIES) + [AUTO_STRATEGY],
                       help="deploy-form strategy; 'auto' chooses per layer for each format")
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    def exported_set_args(p: argparse.ArgumentParser) -> None:
        """Batch axis and ONNX target of the artifacts a command exports."""
        p.add_argument("--static-batch", action="store_true",
                       help="fix the batch (to --batch-size) instead of a dynamic batch axis")
        p.add_argument("--batch-size", type=int, default=1,
                       help="with --static-batch: the fixed batch (other than 1: onnx, onnx-sim "
                       "and ort only)")
        p.add_argument("--onnx-target", default="onnx", choices=["onnx", "ort"],
                       help="onnx: graphs any runtime runs; ort: for ONNX Runtime CPU on this "
                       "machine (with --strategy auto and --static-batch, 3x3 and depthwise "
                       "layers run ORT's NCHWc kernels; a CPU with another NCHWc block refuses "
                       "the file)")

    p = sub.add_parser("convert", help="convert a model to its deploy form and save it",
                       formatter_class=fmt)
    model_args(p, None, 4)
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--target", default="onnx", choices=AUTO_TARGETS,
                   help="export target that --strategy auto chooses for")
    p.add_argument("--static-batch", action="store_true",
                   help="with --strategy auto: the target will run batch 1 only")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="export a model to ONNX, CoreML, ORT and ExecuTorch",
                       formatter_class=fmt)
    model_args(p, None, 4)
    p.add_argument("--formats", default="onnx,onnx-sim,ort,coreml,pte",
                   help="comma-separated: onnx, onnx-sim, ort, coreml, pte")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--coreml-precision", default="fp16", choices=["fp16", "fp32"],
                   help="CoreML compute precision")
    exported_set_args(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("validate", help="check exported artifacts against PyTorch on every "
                       "runtime that can run them", formatter_class=fmt)
    model_args(p, None, 4)
    p.add_argument("--onnx", help="validate this ONNX model (instead of exporting)")
    p.add_argument("--ort", help="validate this .ort model")
    p.add_argument("--pte", help="validate this ExecuTorch program")
    p.add_argument("--coreml", help="validate this .mlpackage")
    p.add_argument("--formats", default="onnx,onnx-sim,ort,coreml,pte",
                   help="formats to export and validate when no artifact is given")
    p.add_argument("--out", default=None, help="keep exported artifacts here (default: temp)")
    p.add_argument("--batches", default=None,
                   help="batch sizes to compare (default: 1,3; with --static-batch the fixed "
                   "batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--images", default=None, help="folder of images to use as inputs")
    exported_set_args(p)
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("bench", help="latency of a model beside its static twin",
                       formatter_class=fmt)
    model_args(p, None, 4)
    p.add_argument("--backends", default="ort,pte,torch",
                   help="comma-separated: torch, ort, ort-format, pte, coreml")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated")
    p.add_argument("--threads", default="1", help="thread counts, comma-separated")
    p.add_argument("--resolution", type=int, default=None, help="input size (default: model's)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up runs per measurement")
    p.add_argument("--iterations", type=int, default=30, help="timed runs per measurement")
    p.add_argument("--budget", type=float, default=None,
                   help="time budget per measurement in seconds (overrides --iterations)")
    p.add_argument("--out", default="bench_out", help="output folder")
    p.add_argument("--static-batch", action="store_true",
                   help="export artifacts with the first --batch baked in (other batches are "
                   "skipped; a size other than 1 for ort and ort-format only)")
    p.add_argument("--fresh-process", action="store_true",
                   help="measure each cell's latency, cold start and memory in a new process")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("run", help="the whole job: convert, export, validate, benchmark, report",
                       formatter_class=fmt)
    model_args(p, "od_resnet18", 4)
    p.add_argument("--out", default="odconv_out", help="report directory")
    p.add_argument("--formats", default="onnx,onnx-sim,ort,coreml,pte", help="formats to export")
    p.add_argument("--backends", default="ort,pte,torch", help="runtimes to benchmark")
    p.add_argument("--threads", type=int, default=1, help="threads for the benchmark")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, smaller inputs")
    p.set_defaults(func=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``odconv-deploy``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ODConvDeployError as exc:
        print(f"odconv-deploy: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
