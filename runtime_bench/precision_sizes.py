"""Artifact sizes per precision: every format in fp32, int8w and int8 where made, fp16, lut6w.

Exports one model (default od_resnet18, kernel_num 4, 224x224) in each precision and writes
``precision_sizes.json`` / ``.md`` with the file sizes, the kernel-bank share of each and the
ratio to the same format in fp32. Sizes do not depend on the weights' values, so the zoo
model's initial weights serve, nor on the calibration's: int8 calibrates on seeded inputs here
(scales only; never an accuracy figure).

    python -m runtime_bench.precision_sizes --out runtime_bench/results
"""

from __future__ import annotations

import argparse
import tempfile

from export.formats import FORMATS
from export.result import ExportFormat
from export.run import export_formats
from odconv_deploy.calibration import calibration_from_data
from odconv_deploy.conversions import Conversions
from odconv_deploy.models import create_model
from odconv_deploy.tables import markdown_table
from odconv_deploy.validation.inputs import seeded_feed
from runtime_bench.probe import machine_info
from runtime_bench.report import write_result_files

#: (precision, Core ML compute precision) pairs measured; the first is the baseline.
VARIANTS = (("fp32", "fp32"), ("fp16", "fp16"), ("int8w", "fp16"), ("int8w", "fp32"),
            ("int8", "fp16"), ("lut6w", "fp16"))
ALL_FORMATS = (ExportFormat.ONNX, ExportFormat.ONNX_SIMPLIFIED, ExportFormat.ORT,
               ExportFormat.EXECUTORCH, ExportFormat.COREML)


def measure(model_name: str, kernel_num: int) -> list[dict[str, object]]:
    """One row per (precision, Core ML compute precision, format) that exported."""
    model = create_model(model_name, kernel_num=kernel_num).eval()
    rows: list[dict[str, object]] = []
    for precision, coreml_precision in VARIANTS:
        calibration = None
        if precision in ("fp16", "lut6w"):
            formats = [ExportFormat.COREML]
        elif precision == "int8":
            formats = [f for f in ALL_FORMATS if precision in FORMATS[f].precisions]
            calibration = calibration_from_data(
                [seeded_feed(model.io_spec, 8, seed=i) for i in range(4)], model.io_spec,
                source="seeded inputs (sizes only)")
        elif coreml_precision == "fp32" and precision != "fp32":
            formats = [ExportFormat.COREML]
        else:
            formats = list(ALL_FORMATS)
        with tempfile.TemporaryDirectory(prefix="odconv_sizes_") as out:
            conversions = Conversions(model, "im2col", precision=precision)
            for r in export_formats(model, out, formats, conversions=conversions,
                                    precision=precision, coreml_precision=coreml_precision,
                                    calibration=calibration):
                split = r.details.get("size_split") or {}
                rows.append({"precision": precision, "format": r.format.value,
                             "coreml_compute": (r.options.get("precision")
                                                if r.format is ExportFormat.COREML else None),
                             "ok": r.ok, "error": r.error, "bytes": r.file_size_bytes,
                             "kernel_bank_bytes": split.get("kernel_bank_bytes")})
    return rows


def _ratio(rows: list[dict[str, object]], row: dict[str, object]) -> float | None:
    base = next((b for b in rows if b["format"] == row["format"] and b["precision"] == "fp32"
                 and b["ok"]), None)
    return None if base is None or not row["ok"] else base["bytes"] / row["bytes"]


def to_markdown(data: dict[str, object]) -> str:
    """The size table with each artifact's ratio to the fp32 one of its format."""
    rows = data["rows"]
    table = markdown_table(
        ["precision", "format", "Core ML compute", "MB", "kernel banks, MB", "fp32 / this"],
        [(r["precision"], r["format"], r["coreml_compute"] or "-",
          f"{r['bytes'] / 1e6:.1f}" if r["ok"] else f"FAILED: {r['error']}",
          "-" if r["kernel_bank_bytes"] is None else f"{r['kernel_bank_bytes'] / 1e6:.1f}",
          "-" if (q := _ratio(rows, r)) is None else f"{q:.2f}") for r in rows])
    machine = ", ".join(f"{k}: {v}" for k, v in data["machine"].items())
    return (f"# Artifact sizes per precision: {data['model']}\n\n"
            "Measured by `python -m runtime_bench.precision_sizes`. fp32 / this is the fp32 "
            "artifact of the same format (Core ML: fp32 compute) over this one.\n\n"
            + "\n".join(table) + f"\n\nMachine: {machine}\n")


def main(argv: list[str] | None = None) -> None:
    """Measure and write ``precision_sizes.json`` and ``.md`` under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="od_resnet18")
    parser.add_argument("--kernel-num", type=int, default=4)
    parser.add_argument("--out", default="runtime_bench/results")
    args = parser.parse_args(argv)
    data = {"model": f"{args.model} (kernel_num={args.kernel_num})",
            "machine": machine_info(), "rows": measure(args.model, args.kernel_num)}
    write_result_files(args.out, "precision_sizes", data, to_markdown(data))
    print(to_markdown(data))


if __name__ == "__main__":
    main()
