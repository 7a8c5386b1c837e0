"""onnxsim simplification, checked: node counts before/after and outputs compared in ORT."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from export.result import (
    ExportError,
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
from odconv_deploy.io_spec import IOSpec, TensorSpec
from odconv_deploy.tolerance import allowed_error
from odconv_deploy.validation.inputs import seeded_feed

#: Allowed max |simplified - raw| relative to max |raw| (fp32 constant folding reorders sums).
SIMPLIFY_RTOL = 1e-4


def _random_feed(graph: object, batch: int, seed: int) -> dict[str, np.ndarray]:
    """The project's seeded feed for the graph's inputs (a symbolic batch takes ``batch``)."""
    shapes = onnx_shapes(list(graph.input))
    first = next(iter(shapes.values()))
    batch = batch if not first or isinstance(first[0], str) else first[0]
    inputs = tuple(TensorSpec(name, (1, *shape[1:])) for name, shape in shapes.items())
    return seeded_feed(IOSpec(inputs, ()), batch, seed=seed)


def compare_in_ort(reference: bytes, candidate: bytes, graph: object, batches: tuple[int, ...]
                   ) -> float:
    """The smallest ``rtol`` that passes the project's rule with ``atol = rtol``.

    That is ``max |candidate - reference| / max(1, max |reference|)`` over seeded inputs in ORT.
    """
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
            worst = max(worst, float(np.abs(r - g).max()
                                     / allowed_error(float(np.abs(r).max()), rtol=1.0, atol=1.0)))
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
    by more than ``rtol``, raises :class:`ExportError` with the reason (like every exporter;
    :func:`export.export_formats` records it and goes on); nothing is written in that case.

    Args:
        source: The raw ONNX file, or the :class:`ExportResult` of :func:`export_onnx`.
        path: Output file (default: ``<raw stem>.sim.onnx`` beside the raw file).
        overwrite: Replace an existing file.
        rtol: Allowed output change relative to ``max(1, max |raw output|)``.

    Raises:
        ExportError: Unreadable input, onnxsim failure, or changed outputs.
        MissingBackendError: onnx, onnxsim or onnxruntime is not installed.
    """
    onnx = require_backend("onnx", extra="onnx", purpose="ONNX simplification")
    onnxsim = require_backend("onnxsim", extra="onnx", purpose="ONNX simplification")
    require_backend("onnxruntime", extra="onnx", purpose="Checking simplified ONNX")
    raw_path = fspath(source.path if isinstance(source, ExportResult) else source)
    path = fspath(path) if path is not None else raw_path.with_suffix(".sim.onnx")
    try:
        raw = onnx.load(str(raw_path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own types
        raise ExportError(f"{raw_path} is not a readable ONNX model: {root_cause(exc)}") from exc
    dynamic_batch = any(isinstance(d, str) for v in onnx_shapes(list(raw.graph.input)).values()
                        for d in v[:1])
    before = len(raw.graph.node)
    try:
        simplified, check_ok = onnxsim.simplify(raw)
    except Exception as exc:
        raise ExportError(f"onnxsim failed: {root_cause(exc)}") from exc
    if not check_ok:
        raise ExportError("onnxsim's own check reports that the simplified model differs")
    batches = (1, 3) if dynamic_batch else (1,)
    try:
        change = compare_in_ort(raw.SerializeToString(), simplified.SerializeToString(),
                                raw.graph, batches)
    except Exception as exc:
        raise ExportError(f"simplified model does not run in ONNX Runtime: "
                          f"{root_cause(exc)}") from exc
    if not change <= rtol:
        raise ExportError(f"simplified outputs differ from the raw model by {change:.2e} "
                          f"(relative; allowed {rtol:g})")
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
        file_size_bytes=path_size(path),
        options={"source": str(raw_path), "rtol": rtol,
                 "weights": next((p.value for p in raw.metadata_props if p.key == "weights"),
                                 None)},
        tool_versions=tool_versions("onnx", "onnxsim"),
        op_counts=dict(Counter(n.op_type for n in graph.node)),
        details={"nodes_before": before, "nodes_after": len(graph.node),
                 "max_rel_change": change, "checked_batches": list(batches)},
    )
