"""Where an ONNX model's time goes in ONNX Runtime: kernel time per operator type.

Exports a zoo model (ODConv deploy form with ``--strategy``, or its static twin with
``--static``) at 224x224, runs it with ONNX Runtime's own profiler on one thread and prints
milliseconds per run for each operator type, then the slowest nodes with their input shapes::

    python -m runtime_bench.ort_profile --model od_resnet18 --strategy im2col
    python -m runtime_bench.ort_profile --model od_mobilenetv2_100 --strategy auto --fixed-batch 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from export import export_onnx
from odconv_deploy.model_source import load_model, static_twin_of
from odconv_deploy.tables import markdown_table
from odconv_deploy.validation.inputs import seeded_feed


def op_type_profile(onnx_path: str | Path, feed: dict[str, np.ndarray], runs: int
                    ) -> tuple[dict[str, float], dict[str, int], list[tuple[float, str, str]]]:
    """Per operator type: milliseconds per run and node count (ONNX Runtime, 1 thread).

    Also returns every node as ``(ms per run, op type, input shapes)``, slowest first.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(onnx_path).with_suffix(""))
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    micros, nodes, per_node, described = Counter(), Counter(), Counter(), {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            micros[op] += event["dur"]
            nodes[op] += 1
            per_node[event["name"]] += event["dur"]
            shapes = [next(iter(d.values())) for d in event["args"].get("input_type_shape", [])]
            described[event["name"]] = (op, str(shapes))
    slowest = [(us / runs / 1e3, *described[name]) for name, us in per_node.most_common()]
    return ({op: us / runs / 1e3 for op, us in micros.most_common()},
            {op: n // runs for op, n in nodes.items()}, slowest)


def main() -> None:
    """Export, profile and print the table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="od_resnet18")
    parser.add_argument("--kernel-num", type=int, default=4)
    parser.add_argument("--strategy", default="im2col")
    parser.add_argument("--fixed-batch", type=int, default=None, metavar="N",
                        help="bake batch N into the graph (default: a dynamic batch)")
    parser.add_argument("--static", action="store_true", help="profile the static twin instead")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=15, help="slowest nodes to list")
    args = parser.parse_args()
    loaded = load_model(args.model, kernel_num=args.kernel_num)
    item = static_twin_of(loaded) if args.static else loaded
    with tempfile.TemporaryDirectory(prefix="ort_profile_") as work:
        result = export_onnx(item.model, Path(work) / "m.onnx", strategy=args.strategy,
                             dynamic_batch=args.fixed_batch is None,
                             batch_size=args.fixed_batch or 1, io_spec=loaded.io_spec,
                             target="onnxruntime")
        feed = seeded_feed(loaded.io_spec, args.fixed_batch or 1)
        ms, nodes, slowest = op_type_profile(result.path, feed, args.runs)
    print(f"{item.name} ({'static' if args.static else args.strategy}), "
          f"layers {result.options.get('layer_forms')}, 1 thread, mean of {args.runs} runs")
    print("\n".join(markdown_table(
        ["op type", "ms per run", "nodes"],
        [*((op, f"{t:.2f}", nodes[op]) for op, t in ms.items()),
         ("total", f"{sum(ms.values()):.2f}", sum(nodes.values()))])))
    print(f"\nslowest {args.top} nodes")
    print("\n".join(markdown_table(["ms per run", "op type", "input shapes"],
                                   [(f"{t:.2f}", op, shapes)
                                    for t, op, shapes in slowest[:args.top]])))


if __name__ == "__main__":
    main()
