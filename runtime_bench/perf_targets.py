"""The performance targets of the project (issue: ODConv close to its static twin).

Runs each target row with the benchmark harness (interleaved A/B rounds against the static
twin, 224x224, medians) at 1 and 2 threads and writes ``perf_targets.{json,md}``::

    python -m runtime_bench.perf_targets --out runtime_bench/results

Two variants, each on every row: ``im2col`` (dynamic-batch artifacts) and ``auto`` (per-layer
choice, with the row's batch baked in: ONNX Runtime then runs computed-weight convs, on its
NCHWc kernels where a layer fits (the ONNX files are exported for target ``ort``), and XNNPACK
delegates every op, where a symbolic batch keeps reshapes and slices out of it).
``--variants auto --merge`` re-measures one variant and keeps the other's committed records.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from odconv_deploy.conversions import Conversions
from odconv_deploy.model_source import load_model
from odconv_deploy.strategy_choice import TUNE_STRATEGY
from odconv_deploy.tables import markdown_table
from runtime_bench.bench import BenchConfig, benchmark
from runtime_bench.bench_formats import parse_bench_formats
from runtime_bench.measure import MeasureSettings
from runtime_bench.probe import machine_info
from runtime_bench.report import write_result_files
from runtime_bench.tune import tune_for_formats


@dataclass(frozen=True)
class Target:
    """One row of the target table."""

    model: str
    kernel_num: int
    format: str  # a BENCH_FORMATS name
    batch: int
    target_ratio: float


TARGETS = (
    Target("od_resnet18", 4, "onnx-sim", 1, 1.3),
    Target("od_resnet18", 1, "onnx-sim", 1, 1.15),
    Target("od_mobilenetv2_100", 4, "onnx-sim", 1, 1.5),
    Target("od_resnet18", 4, "onnx-sim", 8, 1.3),
    Target("od_resnet18", 4, "pte", 1, 1.1),
    Target("od_mobilenetv2_100", 4, "pte", 1, 2.0),
)


#: Variant -> (strategy, whether its artifacts keep a dynamic batch); each runs every row.
#: ``tune`` times each layer's exact forms on this machine first (runtime_bench.tune).
VARIANTS = {"im2col": ("im2col", True), "auto": ("auto", False), "tune": ("tune", False)}


def is_met(ratio_q75: float | None, target_ratio: float) -> bool:
    """A target is met when the upper quartile of the interleaved ratios is within it."""
    return ratio_q75 is not None and ratio_q75 <= target_ratio


def record_key(record: dict[str, object]) -> tuple[object, ...]:
    """Identity of a record: the target row, threads and variant."""
    return tuple(record.get(k) for k in ("model", "kernel_num", "format", "batch", "threads",
                                          "strategy"))


def run_targets(out: Path, threads: tuple[int, ...], settings: MeasureSettings,
                variant: str, rows: tuple[int, ...] | None = None) -> list[dict[str, object]]:
    """Measure the target rows in one variant; one record per (row, threads).

    ``rows``: indices into :data:`TARGETS` (default all).
    """
    strategy, dynamic_batch = VARIANTS[variant]
    records = []
    for index, target in enumerate(TARGETS):
        if rows is not None and index not in rows:
            continue
        start = time.perf_counter()
        loaded = load_model(target.model, kernel_num=target.kernel_num)
        conversions = Conversions(loaded.model, strategy)
        plans = []
        if strategy == TUNE_STRATEGY:
            formats = [b.artifact for b in parse_bench_formats(target.format)]
            plans = tune_for_formats(conversions, loaded.io_spec, formats,
                                     onnx_target="onnxruntime", dynamic_batch=dynamic_batch,
                                     batch_size=target.batch,
                                     progress=lambda s: print(f"   {s}", flush=True))
        config = BenchConfig(formats=target.format, batches=(target.batch,), threads=threads,
                             strategy=strategy, dynamic_batch=dynamic_batch, settings=settings,
                             out=str(out / "work" / f"{target.model}_k{target.kernel_num}"),
                             overwrite=True)
        report = benchmark(loaded, config, conversions=conversions,
                           progress=lambda s: print(f"   {s}", flush=True))
        for row in report.rows:
            if row.role != "odconv":
                continue
            twin = next(r for r in report.rows if r.role == "static" and r.format == row.format
                        and r.batch == row.batch and r.threads == row.threads)
            ratio = row.ratio_to_static.get("ratio_median")
            # The least any form that aggregates the kernel bank can cost: the twin's time
            # plus reading the weights the twin does not have, at this run's read bandwidth.
            twin_ms = twin.latency.get("median_ms")
            read_gbps = report.probes[row.threads].read_gbps
            extra_mb = row.weight_mb - twin.weight_mb
            floor = twin_ms + extra_mb / read_gbps  # MB / (GB/s) = ms
            records.append({
                **asdict(target), "threads": row.threads, "strategy": strategy,
                "batch_axis": "dynamic" if dynamic_batch else "fixed", "status": row.status,
                "reason": row.reason, "odconv_median_ms": row.latency.get("median_ms"),
                "odconv_iqr_ms": row.latency.get("iqr_ms"),
                "static_median_ms": twin_ms,
                "ratio": ratio, "ratio_q25": row.ratio_to_static.get("ratio_q25"),
                "ratio_q75": row.ratio_to_static.get("ratio_q75"),
                # Met only when the upper quartile of the A/B ratios is within the target, so
                # a noisy row whose median dips under it does not count.
                "met": is_met(row.ratio_to_static.get("ratio_q75"), target.target_ratio),
                "floor_ms": row.floor_ms, "achieved_gflops": row.achieved_gflops,
                "weight_mb": row.weight_mb, "extra_weight_mb": extra_mb, "read_gbps": read_gbps,
                "contract_floor_ms": floor,
                "contract_floor_ratio": floor / twin_ms,
                "delegated_share": next((a["details"].get("conv_matmul_macs_delegated_share")
                                         for a in report.artifacts
                                         if a["format"] == "pte" and target.model in
                                         str(a["path"])), None),
                "layer_forms": dict(Counter(conversions.plan(
                    "executorch" if target.format == "pte" else "onnxruntime", dynamic_batch))),
                "tuning": [p.to_dict() for p in plans],
            })
        print(f"{target} done in {time.perf_counter() - start:.0f} s", flush=True)
    return records


TARGET_ORDER = {(t.model, t.kernel_num, t.format, t.batch): i for i, t in enumerate(TARGETS)}


def _table_order(record: dict[str, object]) -> tuple[int, int, int]:
    """Target row, then threads, then variant."""
    return (TARGET_ORDER[record_key(record)[:4]], record["threads"],
            list(VARIANTS).index(record["strategy"]))


def to_markdown(records: list[dict[str, object]], machine: dict[str, str]) -> str:
    """The target table with measured ratios."""
    lines = [f"Machine: {machine['cpu']} ({machine['cores']} cores, "
             f"{machine.get('isa', 'ISA not recorded')}); torch {machine['torch']}, "
             f"onnxruntime {machine['onnxruntime']}, executorch {machine['executorch']}.",
             "Ratio = median of interleaved A/B rounds (ODConv deploy graph / static twin), "
             "IQR in brackets; latencies are per batch; met = upper quartile of the ratio "
             "within the target; ONNX Runtime with 2 threads runs without spin-waiting pool "
             "threads (both models); floor = the least a graph that aggregates the kernel bank "
             "can take, as a ratio: the twin's time plus reading the weights the twin does not "
             "have (ODConv minus twin weight bytes) at the read bandwidth probed in the run.",
             ""]
    rows: list[list[object]] = []
    for r in sorted(records, key=_table_order):
        head = [f"{r['model']} k={r['kernel_num']}", r["format"], r["batch"],
                f"{r['strategy']} ({r['batch_axis']})", r["threads"]]
        if r["status"] != "ok":
            rows.append([*head, f"{r['status']}: {str(r['reason'])[:80]}", "", "",
                         r["target_ratio"], "no", ""])
            continue
        floor = r.get("contract_floor_ratio")
        rows.append([*head, f"{r['odconv_median_ms']:.1f}", f"{r['static_median_ms']:.1f}",
                     f"{r['ratio']:.2f} ({r['ratio_q25']:.2f}-{r['ratio_q75']:.2f})",
                     f"<= {r['target_ratio']}", "yes" if r["met"] else "no",
                     "-" if floor is None else f"{floor:.2f}"])
    lines += markdown_table(["graph", "format", "batch", "strategy (batch axis)", "threads",
                             "ODConv ms", "static ms", "ratio", "target", "met", "floor"],
                            rows)
    profile = layer_class_rows(records)
    if profile:
        lines += ["", "Where tune's time goes: each layer exported and timed alone in the "
                  "target runtime (its own attention, aggregation and conv; medians summed per "
                  "class of conv; the whole graphs are in the table above).", ""]
        lines += markdown_table(["graph", "format", "conv", "layers", "forms chosen",
                                 "sum of layer ms"], profile)
    checks = [(r, plan["whole_graph"]) for r in sorted(records, key=_table_order)
              for plan in r.get("tuning") or [] if plan.get("whole_graph")]
    if checks:
        lines += ["", "Whole-graph checks (tune's plan differed from auto's; both timed whole, "
                  "the faster kept):", ""]
        lines += [f"- {r['model']} k={r['kernel_num']} {r['format']}: tuned plan "
                  f"{c['tuned_ms']:.2f} ms, auto's {c['auto_ms']:.2f} ms: kept {c['kept']}"
                  for r, c in checks]
    return "\n".join(lines) + "\n"


def layer_class_rows(records: list[dict[str, object]]) -> list[list[object]]:
    """Per tune record and class of conv: layers, chosen forms and the sum of their medians."""
    rows: list[list[object]] = []
    for r in sorted(records, key=_table_order):
        for plan in r.get("tuning") or []:
            classes: dict[str, list[dict[str, object]]] = {}
            for layer in plan["layers"]:
                classes.setdefault(layer.get("kind") or "?", []).append(layer)
            for kind, layers in sorted(classes.items()):
                chosen = Counter(layer["chosen"] for layer in layers)
                total = sum(layer["timings_ms"][layer["chosen"]] for layer in layers)
                rows.append([f"{r['model']} k={r['kernel_num']}", r["format"], kind,
                             len(layers), ", ".join(f"{f} x{n}" for f, n in chosen.items()),
                             f"{total:.1f}"])
    return rows


def main() -> None:
    """Run the target table and write the results."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runtime_bench/results"))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--rows", default=None,
                        help="comma-separated row indices of TARGETS (default: all)")
    parser.add_argument("--stem", default="perf_targets",
                        help="result file name (perf_targets_<host> for a partial re-run)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the committed records of the variants not re-measured")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    threads = tuple(int(t) for t in args.threads.split(","))
    settings = MeasureSettings(warmup=args.warmup, iterations=args.iterations)
    machine = machine_info()
    rows = None if args.rows is None else tuple(int(i) for i in args.rows.split(","))
    records = [r for v in variants for r in run_targets(args.out, threads, settings, v, rows)]
    previous = args.out / f"{args.stem}.json"
    if args.merge and previous.exists():
        fresh = {record_key(r) for r in records}
        records += [r for r in json.loads(previous.read_text())["records"]
                    if record_key(r) not in fresh]
    payload = {"machine": machine, "settings": asdict(settings), "threads": threads,
               "records": records}
    write_result_files(args.out, args.stem, payload, to_markdown(records, machine))
    print(to_markdown(records, machine))


if __name__ == "__main__":
    main()
