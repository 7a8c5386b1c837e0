"""Test-set accuracy per precision and artifact on the trained digits models, measured.

For each trained model (:data:`odconv_deploy.digits.DIGITS_MODELS`) exports the int8w
artifacts (ORT, ExecuTorch, Core ML with fp16 compute), the int8 ONNX family and ``.pte``
(calibrated on the model's training split), the lut6w and fp16 Core ML packages, runs the
test set through every runtime that executes them here (Core ML through the MIL executor) and
writes ``precision_accuracy.json`` / ``.md``: top-1 of each against float32 PyTorch, and the
agreement with it.

    python -m runtime_bench.precision_accuracy --out runtime_bench/results
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import asdict
from pathlib import Path

from export.result import ExportFormat
from export.run import export_formats
from export.validation import accuracy_table, candidates_for
from odconv_deploy.calibration import resolve_calibration
from odconv_deploy.conversions import Conversions
from odconv_deploy.digits import DIGITS_MODELS, load_digits_model, load_digits_test
from odconv_deploy.model_source import load_model
from odconv_deploy.runners import TorchRunner
from odconv_deploy.tables import markdown_table
from runtime_bench.probe import machine_info
from runtime_bench.report import write_result_files

INT8W_FORMATS = (ExportFormat.ORT, ExportFormat.EXECUTORCH, ExportFormat.COREML)


def measure(name: str) -> list[dict[str, object]]:
    """Accuracy rows of model ``name``: float32 PyTorch first, then every artifact run."""
    model = load_digits_model(name)
    spec = load_model(name).io_spec
    test = load_digits_test(name)
    with tempfile.TemporaryDirectory(prefix="odconv_accuracy_") as out:
        made = {"int8w": export_formats(
                    model, Path(out) / "int8w", list(INT8W_FORMATS), measure_sizes=False,
                    conversions=Conversions(model, "im2col", precision="int8w")),
                "int8": export_formats(
                    model, Path(out) / "int8", [ExportFormat.ORT, ExportFormat.EXECUTORCH],
                    measure_sizes=False,
                    conversions=Conversions(model, "im2col", precision="int8"),
                    calibration=resolve_calibration("int8", None, spec, zoo_name=name)),
                "lut6w": export_formats(
                    model, Path(out) / "lut6w", [ExportFormat.COREML], measure_sizes=False,
                    conversions=Conversions(model, "im2col", precision="lut6w")),
                "fp16": export_formats(model, Path(out) / "fp16", [ExportFormat.COREML],
                                       precision="fp16", measure_sizes=False)}
        failed = [f"{r.format.value}: {r.error}" for rs in made.values() for r in rs if not r.ok]
        if failed:
            raise RuntimeError(f"{name}: exports failed: {failed}")
        labelled = [(precision, c) for precision, rs in made.items()
                    for c in candidates_for(rs) if not c.bound_only]
        rows = accuracy_table(TorchRunner(model, name="torch fp32 (train form)"),
                              [c for _, c in labelled], test.images, test.labels, batch=32)
    precisions = ["fp32"] + [precision for precision, _ in labelled]
    return [{"model": name, "precision": p, **asdict(row), "images": len(test.labels)}
            for p, row in zip(precisions, rows, strict=True)]


def to_markdown(data: dict[str, object]) -> str:
    """One table per model: each runner's accuracy and its difference from float32."""
    lines = ["# Test-set accuracy per precision: the trained digits models", "",
             "Measured by `python -m runtime_bench.precision_accuracy`. int8w: kernel banks int8 "
             "(Core ML computes in fp16); int8: int8w plus the static convs and linears int8 "
             "in ONNX Runtime and XNNPACK (calibrated on the training split); lut6w: kernel banks "
             "palettized to 64 values (Core ML, fp16 compute); fp16: the Core ML package in "
             "fp16.", ""]
    for name in DIGITS_MODELS:
        rows = [r for r in data["rows"] if r["model"] == name]
        if not rows:
            continue
        fp32 = rows[0]["accuracy"]
        lines += [f"## {name} ({rows[0]['images']} test images)", "", *markdown_table(
            ["precision", "runner", "top-1", "points vs fp32", "agreement with fp32", "note"],
            [(r["precision"], r["runner"], "-" if r["accuracy"] is None else
              f"{r['accuracy']:.4f}",
              "-" if r["accuracy"] is None else f"{100 * (r['accuracy'] - fp32):+.2f}",
              "-" if r["agreement"] is None else f"{r['agreement']:.4f}",
              f"skipped: {r['skipped']}" if r["skipped"] else "") for r in rows]), ""]
    machine = ", ".join(f"{k}: {v}" for k, v in data["machine"].items())
    return "\n".join(lines) + f"Machine: {machine}\n"


def main(argv: list[str] | None = None) -> None:
    """Measure every trained model and write the results under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runtime_bench/results")
    args = parser.parse_args(argv)
    data = {"machine": machine_info(),
            "rows": [row for name in DIGITS_MODELS for row in measure(name)]}
    write_result_files(args.out, "precision_accuracy", data, to_markdown(data))
    print(to_markdown(data))


if __name__ == "__main__":
    main()
