"""What keeping ONNX Runtime's blocked (NCHWc) layout between ``ort_nchwc`` convs buys.

For each model (kernel_num 4, batch 1 baked in, 224x224, one thread) two ONNX graphs are
timed against the static twin, and against each other, in interleaved rounds:

- ``reorders``: last round's plan and export: ``ort_nchwc`` only for ``k > 1`` layers whose
  channels fill whole blocks (1x1 and padded layers on ``dynamic_weight``), and every NCHWc
  conv reorders its input in and its output back (``nchwc_chains=False``);
- ``chained``: ``auto``'s plan (every layer that fits on ``ort_nchwc``, padded where its
  channels are off whole blocks), the maps kept blocked between the convs (the default).

Each pair is timed in its own rounds (one inference of each per round, order alternating)::

    python -m runtime_bench.nchwc_chains --out runtime_bench/results
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from torch import nn

from export import export_onnx
from odconv_deploy.detect import inspect_odconv
from odconv_deploy.layers.ort_nchwc import ort_nchwc_block
from odconv_deploy.model_source import load_model, static_twin_of
from odconv_deploy.reparameterize import convert_model, find_odconv_layers
from odconv_deploy.runners import OnnxRuntimeRunner
from odconv_deploy.tables import markdown_table
from odconv_deploy.validation.inputs import seeded_feed
from runtime_bench.measure import MeasureSettings, interleaved
from runtime_bench.probe import machine_info
from runtime_bench.report import write_result_files
from runtime_bench.stats import paired_ratio

MODELS = ("od_mobilenetv2_100", "od_resnet50", "od_resnet18")
#: The pairs timed, as (A, B) of the ratio A / B.
PAIRS = (("chained", "static"), ("reorders", "static"), ("chained", "reorders"))


def reorders_plan(model: nn.Module, block: int) -> tuple[str, ...]:
    """Last round's ``auto`` plan: ``ort_nchwc`` for ``k > 1`` layers in whole blocks only."""
    plan = []
    for name, layer in find_odconv_layers(model):
        spec = inspect_odconv(layer, name)
        whole = spec.in_channels % block == 0 and spec.out_channels % block == 0
        plan.append("ort_nchwc" if spec.kernel_size > 1 and whole else "dynamic_weight")
    return tuple(plan)


def measure_model(name: str, block: int, settings: MeasureSettings, work: Path
                  ) -> dict[str, object]:
    """Export the two graphs and the twin of ``name``, time the pairs, return the record."""
    loaded = load_model(name, kernel_num=4)
    common = {"dynamic_batch": False, "io_spec": loaded.io_spec, "target": "onnxruntime"}
    reorders = convert_model(loaded.model, strategy="tune",
                             plan=reorders_plan(loaded.model, block)).model
    results = {
        "chained": export_onnx(loaded.model, work / f"{name}_chained.onnx", strategy="auto",
                               **common),
        "reorders": export_onnx(reorders, work / f"{name}_reorders.onnx", nchwc_chains=False,
                                **common),
        "static": export_onnx(static_twin_of(loaded).model, work / f"{name}_static.onnx",
                              **common),
    }
    feed = seeded_feed(loaded.io_spec, 1)
    record: dict[str, object] = {
        "model": name, "kernel_num": 4,
        "reorder_nodes": {k: r.op_counts.get("ReorderInput", 0) + r.op_counts.get(
            "ReorderOutput", 0) for k, r in results.items()},
        "layer_forms": {k: r.options.get("layer_forms") for k, r in results.items()},
    }
    for a, b in PAIRS:
        a_times, b_times = interleaved(OnnxRuntimeRunner(results[a].path, threads=1),
                                       OnnxRuntimeRunner(results[b].path, threads=1),
                                       feed, feed, settings)
        ratio = paired_ratio(a_times, b_times)
        record[f"{a}/{b}"] = {"a_ms": 1e3 * sorted(a_times)[len(a_times) // 2],
                              "b_ms": 1e3 * sorted(b_times)[len(b_times) // 2], **ratio}
        print(name, f"{a}/{b}", f"{ratio['ratio_median']:.3f}", flush=True)
    return record


def to_markdown(records: list[dict[str, object]], machine: dict[str, object],
                iterations: int) -> str:
    """The table the docs quote."""
    rows = []
    for r in records:
        chained, reorders = r["chained/static"], r["reorders/static"]
        versus = r["chained/reorders"]
        rows.append([
            f"{r['model']} k={r['kernel_num']}",
            f"{reorders['a_ms']:.1f} ({reorders['ratio_median']:.2f}x)",
            f"{chained['a_ms']:.1f} ({chained['ratio_median']:.2f}x)",
            f"{chained['b_ms']:.1f}",
            f"{versus['ratio_median']:.3f} ({versus['ratio_q25']:.3f}-{versus['ratio_q75']:.3f})",
            f"{r['reorder_nodes']['reorders']} -> {r['reorder_nodes']['chained']}",
        ])
    header = (f"Machine: {machine.get('cpu')} ({machine.get('cores')} cores, "
              f"{machine.get('isa')}); torch {machine.get('torch')}, onnxruntime "
              f"{machine.get('onnxruntime')}, NCHWc block {records[0]['block']}. "
              f"Batch 1 baked in, 224x224, 1 thread, {iterations} interleaved rounds "
              "per pair; ms are medians, (x) the median per-round ratio to the static twin; "
              "chained / reorders: median per-round ratio (IQR). Reorder nodes: ReorderInput "
              "+ ReorderOutput in the graph (the graph's one guard probe included).\n\n")
    table = markdown_table(["graph", "reorders ms", "chained ms", "static ms",
                            "chained / reorders", "reorder nodes"], rows)
    return header + "\n".join(table) + "\n"


def main() -> None:
    """Measure every model and write ``nchwc_chains.{json,md}``."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runtime_bench/results"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    block = ort_nchwc_block()
    if block is None:
        parser.error("this onnxruntime has no NCHWc kernels: nothing to compare")
    settings = MeasureSettings(warmup=args.warmup, iterations=args.iterations)
    records = []
    with tempfile.TemporaryDirectory(prefix="nchwc_chains_") as work:
        for name in (m.strip() for m in args.models.split(",") if m.strip()):
            records.append({**measure_model(name, block, settings, Path(work)),
                            "block": block})
    machine = machine_info()
    table = to_markdown(records, machine, settings.iterations)
    write_result_files(args.out, "nchwc_chains", {"machine": machine, "warmup": settings.warmup,
                                                  "iterations": settings.iterations,
                                                  "records": records}, table)
    print(table, end="")


if __name__ == "__main__":
    main()
