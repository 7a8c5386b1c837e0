"""Per-layer latency of the depthwise deploy forms against a static depthwise conv.

The evidence behind ``strategy="auto"``'s depthwise rules: for each depthwise shape of
od_mobilenetv2_100 (kernel_num=4, batch 1), the ``im2col`` form (one-hot conv + reduce), the
``depthwise_taps`` form (k*k slices) and a static depthwise ``nn.Conv2d`` are exported and
timed as ONNX (in ONNX Runtime) and ExecuTorch (XNNPACK) programs, alternating so drift hits
all of them; ONNX Runtime also times the fixed-batch forms ``dynamic_weight`` and
``ort_nchwc`` (its NCHWc kernels; skipped where this onnxruntime has none). ``taps_core`` is
``depthwise_taps`` without its attention and kernel aggregation: the k*k multiply-adds alone,
with the per-sample weight given. On XNNPACK, which takes no run-time conv weight, the
per-sample depthwise costs at least that with stock ops; the table's last row sums each form
over od_mobilenetv2_100's 17 depthwise layers::

    python -m runtime_bench.depthwise_forms --out runtime_bench/results
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from export import export_executorch, export_onnx
from odconv_deploy.detect import inspect_odconv
from odconv_deploy.io_spec import IOSpec, TensorSpec
from odconv_deploy.layers import LAYER_FORMS, ODConv2d
from odconv_deploy.layers.deploy import DepthwiseTapsODConv2d
from odconv_deploy.layers.ort_nchwc import ort_nchwc_block
from odconv_deploy.runners import ExecuTorchRunner, OnnxRuntimeRunner
from odconv_deploy.tables import markdown_table
from odconv_deploy.validation.inputs import seeded_feed
from runtime_bench.probe import machine_info
from runtime_bench.report import write_result_files

#: (channels, input size, stride) of od_mobilenetv2_100's 3x3 depthwise layers (distinct ones).
SHAPES = ((32, 112, 1), (96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1), (192, 28, 2),
          (384, 14, 1), (576, 14, 1), (576, 14, 2), (960, 7, 1))
#: How many of od_mobilenetv2_100's depthwise layers have each shape of SHAPES (17 in all).
LAYERS_PER_SHAPE = (1, 1, 1, 1, 2, 1, 4, 2, 1, 3)
#: Forms timed per format (XNNPACK does not take a computed conv weight).
FORMS = {"onnx": ("im2col", "depthwise_taps", "dynamic_weight", "ort_nchwc", "taps_core",
                  "static"),
         "pte": ("im2col", "depthwise_taps", "taps_core", "static")}


class TapsCore(nn.Module):
    """``depthwise_taps``' multiply-adds alone: a fixed per-sample weight, no attention."""

    def __init__(self, layer: DepthwiseTapsODConv2d) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("weight", torch.randn(1, layer.in_channels, layer.taps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.layer.multiply_taps(x, self.weight)


def build(form: str, channels: int, stride: int, seed: int) -> nn.Module:
    """One depthwise layer in ``form`` (random weights; latency does not depend on them)."""
    torch.manual_seed(seed)
    if form == "static":
        return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False).eval()
    layer = ODConv2d(channels, channels, 3, stride, 1, groups=channels, kernel_num=4).eval()
    if form == "taps_core":
        return TapsCore(DepthwiseTapsODConv2d.from_spec(inspect_odconv(layer))).eval()
    return LAYER_FORMS[form].from_spec(inspect_odconv(layer)).eval()


def measure_shape(channels: int, size: int, stride: int, formats: list[str], iterations: int,
                  work: Path) -> dict[str, dict[str, float]]:
    """Median ms per (format, form) for one shape."""
    shape = (1, channels, size, size)
    runners = {}
    for fmt in formats:
        for form in FORMS[fmt]:
            if form == "ort_nchwc" and ort_nchwc_block() is None:
                continue
            model = build(form, channels, stride, seed=channels)
            stem = work / f"dw_{channels}_{size}_{stride}_{form}"
            if fmt == "onnx":
                result = export_onnx(model, f"{stem}.onnx", input_shape=shape, overwrite=True,
                                     dynamic_batch=form in ("static", "taps_core")
                                     or LAYER_FORMS[form].supports_dynamic_batch)
                runners["onnx", form] = OnnxRuntimeRunner(result.path, threads=1)
            else:
                result = export_executorch(model, f"{stem}.pte", input_shape=shape,
                                           dynamic_batch=False, overwrite=True)
                runners["pte", form] = ExecuTorchRunner.from_export(result, threads=1)
    feed = seeded_feed(IOSpec((TensorSpec("input", shape),), ()), 1)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    for runner in runners.values():
        runner.activate()
    try:
        for i in range(iterations + 3):  # 3 warm-up rounds
            for key, runner in runners.items():
                start = time.perf_counter()
                runner.infer(feed)
                if i >= 3:
                    times[key].append(time.perf_counter() - start)
    finally:
        for runner in runners.values():
            runner.deactivate()
    medians: dict[str, dict[str, float]] = {}
    for (fmt, form), samples in times.items():
        medians.setdefault(fmt, {})[form] = 1e3 * statistics.median(samples)
    return medians


def to_markdown(records: list[dict[str, object]], machine: dict[str, str], iterations: int
                ) -> str:
    """The per-layer table of ``depthwise_forms.md`` (rebuilt from its JSON by a test)."""
    formats = {r["format"] for r in records}
    columns = FORMS["onnx"] if "onnx" in formats else FORMS["pte"]

    def cell(record: dict[str, object], form: str) -> str:
        ms = record.get(f"{form}_ms")
        return "-" if ms is None else f"{ms:.2f}"

    rows = [[r["format"], r["channels"], r["size"], r["stride"], *(cell(r, f) for f in columns)]
            for r in sorted(records, key=lambda r: r["format"])]
    count = dict(zip(SHAPES, LAYERS_PER_SHAPE, strict=True))
    for fmt in sorted(formats):
        mine = [r for r in records if r["format"] == fmt]
        if {(r["channels"], r["size"], r["stride"]) for r in mine} != set(SHAPES):
            continue  # a partial run has no model total

        def total(form: str, mine: list[dict[str, object]] = mine) -> str:
            if any(r.get(f"{form}_ms") is None for r in mine):
                return "-"
            ms = sum(count[r["channels"], r["size"], r["stride"]] * r[f"{form}_ms"] for r in mine)
            return f"{ms:.2f}"

        rows.append([fmt, "all 17 layers", "", "", *(total(f) for f in columns)])
    lines = [f"Machine: {machine['cpu']} ({machine['cores']} cores, {machine['isa']}); 1 thread, "
             f"batch 1, kernel_num 4, median of {iterations} alternating runs (ms); onnx runs in "
             "ONNX Runtime, pte in ExecuTorch (XNNPACK); - : form not available in that format; "
             "taps_core: the k*k multiply-adds of depthwise_taps alone (weight given); all 17 "
             "layers: each shape times its number of layers in od_mobilenetv2_100.",
             "", *markdown_table(["format", "channels", "size", "stride", *columns], rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure every shape and write ``depthwise_forms.{json,md}``."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runtime_bench/results"))
    parser.add_argument("--formats", default="onnx,pte")
    parser.add_argument("--iterations", type=int, default=25)
    args = parser.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    records = []
    with tempfile.TemporaryDirectory(prefix="depthwise_forms_") as work:
        for channels, size, stride in SHAPES:
            medians = measure_shape(channels, size, stride, formats, args.iterations,
                                    Path(work))
            for fmt, by_form in medians.items():
                records.append({"channels": channels, "size": size, "stride": stride,
                                "format": fmt, **{f"{f}_ms": ms for f, ms in by_form.items()}})
                print(records[-1], flush=True)
    machine = machine_info()
    table = to_markdown(records, machine, args.iterations)
    write_result_files(args.out, "depthwise_forms", {"machine": machine, "iterations":
                                                     args.iterations, "records": records}, table)
    print(table, end="")


if __name__ == "__main__":
    main()
