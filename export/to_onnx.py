"""ONNX export: dynamic batch, I/O names from the spec, full checker, provenance metadata."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from export.nchwc_chains import keep_blocked_between_convs, tensor_shapes
from export.nchwc_graph import count_unblocked_convs, rewrite_nchwc_convs
from export.prepare import (
    PreparedModel,
    check_batch_size,
    format_layer_forms,
    nchwc_block_of,
    prepare_model,
    require_dynamic_batch_support,
)
from export.quantize_onnx import (
    QuantizationPlan,
    plan_quantization,
    quantize_static_nodes,
)
from export.result import (
    ExportError,
    ExportFormat,
    ExportResult,
    fspath,
    path_size,
    root_cause,
    tool_versions,
)
from odconv_deploy._atomic import atomic_output
from odconv_deploy.calibration import CalibrationSet
from odconv_deploy.errors import require_backend
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.layers.deploy import ODConv2dDeploy
from odconv_deploy.layers.ort_nchwc import BLOCK_METADATA_KEY
from odconv_deploy.quantize import INT8_STORAGE, weight_storage
from odconv_deploy.strategy_choice import canonical_target

#: Default opset: recent, and accepted by ONNX Runtime (incl. Mobile), onnxsim and the dynamo
#: exporter (which needs >= 18).
DEFAULT_OPSET = 18
#: Protobuf's hard limit; larger models keep their weights in an external data file.
PROTOBUF_LIMIT = 2 * 1024**3
EXPORTERS = ("dynamo", "torchscript")
#: What an ONNX graph is for: ``onnx`` any runtime; ``ort`` ONNX Runtime's CPU kernels on
#: this machine (``strategy="auto"`` may then use ``ort_nchwc`` layers).
ONNX_TARGETS = ("onnx", "onnxruntime")


def onnx_shapes(values: list) -> dict[str, list[int | str]]:
    """Name -> shape (``dim_param`` strings for symbolic dims) of ONNX graph values."""
    shapes = {}
    for value in values:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_param if d.dim_param else d.dim_value for d in dims]
    return shapes


def _dynamic_axes(spec: IOSpec, batch: bool, spatial: bool) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for t in spec.inputs:
        axes[t.name] = {}
        if batch:
            axes[t.name][0] = "batch"
        if spatial and len(t.shape) == 4:
            axes[t.name].update({2: "height", 3: "width"})
    for t in spec.outputs:
        axes[t.name] = {0: "batch"} if batch else {}
    return axes


def _export(prepared: PreparedModel, target: Path, opset: int, exporter: str,
            axes: dict[str, dict[int, str]], external: bool, batch_size: int) -> None:
    spec = prepared.io_spec
    inputs = spec.sample_inputs(batch=batch_size)
    kwargs = dict(input_names=spec.input_names, output_names=spec.output_names,
                  opset_version=opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter; errors still raise
        if exporter == "dynamo":
            dims = tuple(
                {a: torch.export.Dim(n if n == "batch" else f"{t.name}_{n}",
                                     min=1 if n == "batch" else 8, max=4096)
                 for a, n in axes.get(t.name, {}).items()}
                for t in spec.inputs)
            program = torch.onnx.export(
                prepared.model, inputs, None, dynamo=True, dynamic_shapes=dims,
                optimize=True, external_data=external, **kwargs)
            program.save(str(target), external_data=external)
        else:
            torch.onnx.export(prepared.model, inputs, str(target), dynamo=False,
                              dynamic_axes=axes, do_constant_folding=True, **kwargs)


def _use_nchwc_kernels(proto: object, block: int, chains: bool) -> tuple[int, int]:
    """Rewrite the ``ort_nchwc`` layers' convs to ORT's NCHWc ops, checked.

    With ``chains``, the maps stay blocked between them where the ops between allow it.
    Returns how many convs were rewritten and how many reorders back to NCHW the chains saved.
    """
    shapes = tensor_shapes(proto)
    rewritten = rewrite_nchwc_convs(proto, block)
    saved = keep_blocked_between_convs(proto, block, shapes) if chains else 0
    left = count_unblocked_convs(proto, block)
    if left:
        raise ExportError(f"{left} conv(s) of ort_nchwc layers kept their unblocked weight "
                          "after the NCHWc rewrite (an unexpected graph pattern). Note: use "
                          "target='onnx', and report this with the model.")
    return rewritten, saved


def _quantize(tmp: Path, prepared: PreparedModel, calibration: CalibrationSet,
              reduce_range: bool, batch: int) -> QuantizationPlan:
    """Quantize the exported graph at ``tmp`` in place (int8: static nodes QDQ, calibrated)."""
    onnx = require_backend("onnx", extra="onnx", purpose="int8 quantization")
    layers = [n for n, m in prepared.model.named_modules() if isinstance(m, ODConv2dDeploy)]
    plan = plan_quantization(onnx.load(str(tmp)), prepared.model, layers)
    quantized = tmp.with_name(f"int8_{tmp.name}")
    quantize_static_nodes(tmp, quantized, plan, calibration, reduce_range=reduce_range,
                          batch=batch)
    os.replace(quantized, tmp)
    return plan


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    batch_size: int = 1,
    dynamic_spatial: bool = False,
    strategy: str | None = None,
    target: str = "onnx",
    exporter: str = "torchscript",
    io_spec: IOSpec | None = None,
    input_shape: tuple[int, ...] | None = None,
    name: str | None = None,
    overwrite: bool = False,
    calibration: CalibrationSet | None = None,
    reduce_range: bool = False,
    nchwc_chains: bool = True,
) -> ExportResult:
    """Export a model (train form converted automatically) to ONNX.

    Args:
        model: Zoo model, user network with ODConv layers, or a deploy-form model.
        path: Output ``.onnx`` file.
        opset: ONNX opset.
        dynamic_batch: Make the batch axis symbolic.
        batch_size: The fixed batch of the graph when ``dynamic_batch`` is False (e.g. 8 for
            a server that always runs 8 images: ``dynamic_weight`` unrolls that many convs).
        dynamic_spatial: Also make image height and width symbolic.
        strategy: Deploy strategy for train-form ODConv layers (default ``im2col``).
        target: ``"onnx"`` for a graph any runtime runs, or ``"onnxruntime"`` for ONNX Runtime
            CPU on this machine: with ``strategy="auto"`` and a fixed batch, layers that fit
            then run ORT's NCHWc kernels (``ort_nchwc``; the block size is recorded in the
            metadata and a CPU with another block refuses the graph).
        exporter: ``"dynamo"`` (torch.export based) or ``"torchscript"`` (legacy tracer).
        io_spec: I/O names and shapes (default: ``model.io_spec``).
        input_shape: Input shape for models without an ``io_spec``.
        name: Model name stamped into the metadata.
        overwrite: Replace an existing file.
        calibration: Make an ``int8`` graph: the static convs and linears quantized (QDQ)
            with activation ranges from these samples (:mod:`export.quantize_onnx`; the model
            should store its kernel banks int8, the ``int8`` conversions do).
        reduce_range: With ``calibration``: 7-bit weights, for x86 CPUs without VNNI.
        nchwc_chains: With ``ort_nchwc`` layers: keep the maps in ORT's blocked layout from
            one NCHWc conv to the next wherever the ops between can read it (False: reorder
            around each conv; ``runtime_bench.nchwc_chains`` compares the two).

    Returns:
        The :class:`ExportResult`; the file is written whole or not at all.

    Raises:
        ExportError: Unknown exporter, a strategy that cannot take a dynamic batch, an opset the
            graph cannot use, or a model that fails to trace (the message names the cause).
    """
    onnx = require_backend("onnx", extra="onnx", purpose="ONNX export")
    if exporter not in EXPORTERS:
        raise ExportError(f"Unknown exporter {exporter!r}. Note: choose one of {EXPORTERS}.")
    target = canonical_target(target)
    if target not in ONNX_TARGETS:
        raise ExportError(f"Unknown ONNX target {target!r}. Note: choose one of "
                          f"{ONNX_TARGETS}.")
    if exporter == "dynamo":
        require_backend("onnxscript", extra="onnx", purpose="The dynamo ONNX exporter")
    if calibration is not None and exporter != "torchscript":
        raise ExportError("int8 ONNX is made from the torchscript exporter's graph (its node "
                          "names say which module each node is). Note: pass "
                          "exporter='torchscript'.")
    check_batch_size(batch_size, dynamic_batch)
    prepared = prepare_model(model, strategy=strategy, target=target, dynamic_batch=dynamic_batch,
                             io_spec=io_spec, input_shape=input_shape, name=name)
    if dynamic_batch:
        require_dynamic_batch_support(prepared, "dynamic_batch")
    block = nchwc_block_of(prepared.model)
    if block is not None and exporter == "dynamo":
        raise ExportError("ort_nchwc layers export with the torchscript exporter only (the "
                          "NCHWc rewrite is built for its graphs). Note: pass "
                          "exporter='torchscript'.")
    if block is not None and calibration is not None:
        raise ExportError("int8 cannot take ort_nchwc layers (their NCHWc rewrite reads a float "
                          "bank). Note: export with target='onnx'.")
    axes = _dynamic_axes(prepared.io_spec, dynamic_batch, dynamic_spatial)
    weight_bytes = sum(p.numel() * p.element_size() for p in prepared.model.parameters())
    external = weight_bytes > PROTOBUF_LIMIT
    if external and calibration is not None:
        raise ExportError(f"int8 ONNX of a model over 2 GiB ({weight_bytes / 2**30:.1f} GiB of "
                          "weights) is not supported. Note: use --precision int8w.")
    path = fspath(path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        try:
            _export(prepared, tmp, opset, exporter, axes, external, batch_size)
        except Exception as exc:
            raise ExportError(
                f"ONNX export of {prepared.name} (exporter={exporter}, opset={opset}) failed: "
                f"{root_cause(exc)}. Note: opset {DEFAULT_OPSET} is the tested default; the "
                "dynamo exporter needs opset >= 18."
            ) from exc
        plan = None
        if calibration is not None:
            plan = _quantize(tmp, prepared, calibration, reduce_range,
                             1 if dynamic_batch else batch_size)
        proto = onnx.load(str(tmp), load_external_data=False)
        nchwc_convs, chained = (_use_nchwc_kernels(proto, block, nchwc_chains)
                                if block is not None else (0, 0))
        storage = INT8_STORAGE if plan is not None else weight_storage(prepared.model)
        meta = {"producer": "odconv-deploy", "model": prepared.name,
                "strategy": prepared.strategy or "none", "exporter": exporter,
                "layer_strategies": format_layer_forms(prepared.layer_forms),
                "weights": storage,
                **({"int8_nodes": plan.describe(), "calibration": calibration.describe(),
                    "reduce_range": reduce_range} if plan is not None else {}),
                **({BLOCK_METADATA_KEY: block} if block is not None else {}),
                **{f"version.{k}": v for k, v in tool_versions("onnx").items()}}
        del proto.metadata_props[:]
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=str(value))
        if external:
            onnx.save_model(proto, str(tmp), save_as_external_data=True,
                            location=f"{path.name}.data")
            onnx.checker.check_model(str(tmp), full_check=True)
        else:
            onnx.save_model(proto, str(tmp))
            onnx.checker.check_model(proto, full_check=True)
        if external:  # the weights file must land beside the final name
            os.replace(tmp.parent / f"{path.name}.data", path.parent / f"{path.name}.data")
    graph = proto.graph
    return ExportResult(
        format=ExportFormat.ONNX, path=path,
        input_names=[i.name for i in graph.input], output_names=[o.name for o in graph.output],
        input_shapes=onnx_shapes(list(graph.input)),
        output_shapes=onnx_shapes(list(graph.output)),
        file_size_bytes=path_size(path),
        options={"opset": opset, "dynamic_batch": dynamic_batch, "batch_size": batch_size,
                 "dynamic_spatial": dynamic_spatial, "strategy": prepared.strategy,
                 "target": target, "nchwc_block": block,
                 "nchwc_chains": nchwc_chains if block is not None else None,
                 "layer_forms": prepared.layer_forms,
                 "exporter": exporter, "external_data": external, "model": prepared.name,
                 "weights": storage, "reduce_range": reduce_range if plan else None,
                 "calibration": calibration.describe() if plan else None},
        tool_versions=tool_versions("onnx"),
        op_counts=dict(Counter(n.op_type for n in graph.node)),
        details={"nodes": len(graph.node), "converted_layers": prepared.converted_layers,
                 "nchwc_convs": nchwc_convs, "nchwc_reorders_saved": chained,
                 **({"int8_nodes": len(plan.static)} if plan is not None else {})},
        notes=[plan.describe()] if plan is not None else [],
    )
