"""onnxsim simplification, checked: node counts before/after and outputs compared in ORT."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from export._common import (
    ExportFormat,
    ExportResult,
    fspath,
    path_size,
    root_cause,
    tool_versions,
)
from export.to_onnx import onnx_shapes
from odconv_deploy._atomic import atomic_output
from odconv_deploy.errors import require_backend

#: Allowed max |simplified - raw| relative to max |raw| (fp32 constant folding reorders sums).
SIMPLIFY_RTOL = 1e-4


def _random_feed(graph: object, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for value in graph.input:
        dims = [batch if isinstance(d, str) else d for d in onnx_shapes([value])[value.name]]
        feed[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feed


def compare_in_ort(reference: bytes, candidate: bytes, graph: object, batches: tuple[int, ...]
                   ) -> float:
    """Max |candidate - reference| / max(1, max |reference|) over seeded inputs in ORT."""
    ort = require_backend("onnxruntime", extra="onnx", purpose="Checking simplified ONNX")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sessions = [ort.InferenceSession(m, opts, providers=["CPUExecutionProvider"])
                for m in (reference, candidate)]
    worst = 0.0
    for batch in batches:
        feed = _random_feed(graph, batch, seed=batch)
        ref, got = (s.run(None, feed) for s in sessions)
        for r, g in zip(ref, got, strict=True):
            worst = max(worst, float(np.abs(r - g).max() / max(1.0, np.abs(r).max())))
    return worst


def simplify_onnx(
    source: str | os.PathLike | ExportResult,
    path: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    rtol: float = SIMPLIFY_RTOL,
) -> ExportResult:
    """Simplify an ONNX model with onnxsim and check that its outputs did not change.

    The simplified model is written beside the raw one (``model.sim.onnx``) unless ``path``
    is given. A failure of onnxsim, or outputs that differ from the raw model's in ONNX Runtime
    by more than ``rtol``, is returned as a result with ``ok=False`` and the reason; nothing is
    written in that case.

    Args:
        source: The raw ONNX file, or the :class:`ExportResult` of :func:`export_onnx`.
        path: Output file (default: ``<raw stem>.sim.onnx`` beside the raw file).
        overwrite: Replace an existing file.
        rtol: Allowed output change relative to ``max(1, max |raw output|)``.
    """
    onnx = require_backend("onnx", extra="onnx", purpose="ONNX simplification")
    onnxsim = require_backend("onnxsim", extra="onnx", purpose="ONNX simplification")
    require_backend("onnxruntime", extra="onnx", purpose="Checking simplified ONNX")
    raw_path = fspath(source.path if isinstance(source, ExportResult) else source)
    path = fspath(path) if path is not None else raw_path.with_suffix(".sim.onnx")
    raw = onnx.load(str(raw_path))
    dynamic_batch = any(isinstance(d, str) for v in onnx_shapes(list(raw.graph.input)).values()
                        for d in v[:1])
    before = len(raw.graph.node)
    failed = ExportResult(
        format=ExportFormat.ONNX_SIMPLIFIED, path=path, input_names=[], output_names=[],
        input_shapes={}, output_shapes={}, file_size_bytes=0,
        tool_versions=tool_versions("onnx", "onnxsim"), details={"nodes_before": before},
        ok=False)
    try:
        simplified, check_ok = onnxsim.simplify(raw)
    except Exception as exc:  # noqa: BLE001 - reported in the result, not swallowed
        failed.error = f"onnxsim failed: {root_cause(exc)}"
        return failed
    if not check_ok:
        failed.error = "onnxsim's own check reports that the simplified model differs"
        return failed
    batches = (1, 3) if dynamic_batch else (1,)
    try:
        change = compare_in_ort(raw.SerializeToString(), simplified.SerializeToString(),
                                raw.graph, batches)
    except Exception as exc:  # noqa: BLE001
        failed.error = f"simplified model does not run in ONNX Runtime: {root_cause(exc)}"
        return failed
    if not change <= rtol:
        failed.error = (f"simplified outputs differ from the raw model by {change:.2e} "
                        f"(relative; allowed {rtol:g})")
        failed.details["max_rel_change"] = change
        return failed
    del simplified.metadata_props[:]
    simplified.metadata_props.extend(raw.metadata_props)
    simplified.metadata_props.add(key="simplified_by", value="onnxsim")
    with atomic_output(path, overwrite=overwrite) as tmp:
        onnx.save_model(simplified, str(tmp))
    graph = simplified.graph
    return ExportResult(
        format=ExportFormat.ONNX_SIMPLIFIED, path=path,
        input_names=[i.name for i in graph.input], output_names=[o.name for o in graph.output],
        input_shapes=onnx_shapes(list(graph.input)),
        output_shapes=onnx_shapes(list(graph.output)),
        file_size_bytes=path_size(path), options={"source": str(raw_path), "rtol": rtol},
        tool_versions=tool_versions("onnx", "onnxsim"),
        op_counts=dict(Counter(n.op_type for n in graph.node)),
        details={"nodes_before": before, "nodes_after": len(graph.node),
                 "max_rel_change": change, "checked_batches": list(batches)},
    )
