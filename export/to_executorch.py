"""ExecuTorch ``.pte`` lowered with the XNNPACK partitioner, with a delegation report."""

from __future__ import annotations

import inspect
import os
import warnings
from collections import Counter

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import optimization_hint as hint_int

from export.prepare import prepare_model, require_dynamic_batch_support
from export.quantize_pt2e import quantize_program, static_module_names
from export.result import (
    ExportError,
    ExportFormat,
    ExportResult,
    fspath,
    path_size,
    pt2e_reference_path,
    root_cause,
    spec_shapes,
    tool_versions,
)
from odconv_deploy._atomic import atomic_output
from odconv_deploy.calibration import CalibrationSet
from odconv_deploy.errors import require_backend
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.layers.deploy import ODConv2dDeploy
from odconv_deploy.quantize import INT8_STORAGE, weight_storage

#: aten ops whose MACs count as "conv/matmul MACs" (training IR and edge dialect names).
_CONV_OPS = ("aten.convolution", "aten.conv2d")
_MATMUL_OPS = ("aten.mm", "aten.bmm", "aten.addmm", "aten.linear", "aten.matmul")


def _aten_name(node: torch.fx.Node) -> str | None:
    """``aten.<op>`` of a call_function node (plain or edge-dialect overload), else None."""
    import re

    found = re.search(r"aten\.[A-Za-z0-9_]+", str(node.target))
    return found.group(0) if found else None


def node_macs(node: torch.fx.Node) -> int:
    """Multiply-accumulates of a conv or matmul node, from its fake-tensor metadata."""
    name = _aten_name(node)
    out = node.meta.get("val")
    if name is None or not isinstance(out, torch.Tensor):
        return 0
    # optimization_hint reads a symbolic size's example value without adding a guard; int() would
    # specialise the batch and silently make a "dynamic" program static.
    try:
        numel = hint_int(out.numel())
        if name in _CONV_OPS:
            return numel * hint_int(node.args[1].meta["val"][0].numel())
        operand = node.args[1] if name == "aten.addmm" else node.args[0]
        return numel * hint_int(operand.meta["val"].shape[-1])
    except (TypeError, KeyError, AttributeError, RuntimeError):
        return 0


def conv_matmul_macs(graph_module: torch.fx.GraphModule) -> tuple[int, Counter]:
    """Total conv/matmul MACs of the top-level graph and the op names that carry them.

    Symbolic batch sizes are counted at their example value (the hint).
    """
    total, names = 0, Counter()
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and _aten_name(node) in _CONV_OPS + _MATMUL_OPS:
            total += node_macs(node)
            names[_aten_name(node)] += 1
    return total, names


def xnnpack_partitioner() -> object:
    """XNNPACK's partitioner, also delegating fp32 linears whose weight is computed at run time.

    Stock, a linear is delegated only with a constant weight, and the partitioner's one switch
    (``force_non_static_weights_for_f32_linear``) makes every fp32 linear take its weight at
    run time, so constant weights (attention, classifier) would be repacked on each inference.
    This config keeps constant weights prepacked and sends computed ones (``dynamic_linear``
    layers) to XNNPACK's fully-connected op, which packs them per run.
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.utils.utils import get_input_node, is_param_node

    class RuntimeWeightLinearConfig(LinearConfig):
        def _get_weight_deps(self, node: torch.fx.Node, ep: object, precision: object
                             ) -> tuple[bool, list[torch.fx.Node]]:
            weight = get_input_node(node, self.weight_idx)
            if precision == ConfigPrecisionType.FP32 and not is_param_node(ep, weight):
                return True, []  # a run-time operand of the op, like its input
            return super()._get_weight_deps(node, ep, precision)

    configs = [RuntimeWeightLinearConfig if config is LinearConfig else config
               for config in ALL_PARTITIONER_CONFIGS]
    return XnnpackPartitioner(configs=configs)


def _restore_batch_range(edge: object, max_batch: int) -> None:
    """Undo a batch-range narrowing that lowering convs to XNNPACK introduces.

    PyTorch's fake conv kernel guards ``batch < 16`` while choosing a conv backend; the
    guard narrows the shared range of the batch symbol, and ExecuTorch then plans memory for
    batch <= 15 whatever the declared maximum. The guard only affects fake-tensor backend
    selection, not the numbers, so the declared range is restored before memory planning.
    (The planned bound is still read back from the program and reported.)
    """
    from torch.utils._sympy.value_ranges import ValueRanges

    for node in edge.exported_program().graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], torch.SymInt):
            sym = val.shape[0].node
            sym.shape_env.var_to_range[sym.expr] = ValueRanges(1, max_batch)


def _planned_batch(path: os.PathLike) -> int:
    """Largest batch the program's memory plan holds (read from the first input's sizes)."""
    from executorch.runtime import Runtime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = Runtime.get().load_program(str(path)).load_method("forward")
        return int(method.metadata.input_tensor_meta(0).sizes()[0])


def export_executorch(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    max_batch: int = 64,
    strategy: str | None = None,
    io_spec: IOSpec | None = None,
    input_shape: tuple[int, ...] | None = None,
    name: str | None = None,
    overwrite: bool = False,
    calibration: CalibrationSet | None = None,
) -> ExportResult:
    """Lower a model (train form converted automatically) to an ExecuTorch ``.pte`` (XNNPACK).

    The result reports what was delegated to XNNPACK and what fell back to the portable
    kernels: op counts on each side and the share of conv/matmul MACs that XNNPACK runs.

    Args:
        model: Zoo model, user network with ODConv layers, or a deploy-form model.
        path: Output ``.pte`` file.
        dynamic_batch: Symbolic batch ``1..max_batch``.
        max_batch: Upper bound of the dynamic batch.
        strategy: Deploy strategy for train-form ODConv layers (default ``im2col``).
        io_spec: I/O names and shapes (default: ``model.io_spec``).
        input_shape: Input shape for models without an ``io_spec``.
        name: Model name (for messages).
        overwrite: Replace an existing file.
        calibration: Make an ``int8`` program: the static convs and linears quantized by the
            XNNPACK PT2E quantizer on these samples (:mod:`export.quantize_pt2e`), its
            PyTorch reference saved beside the ``.pte``.

    Raises:
        ExportError: torch.export or lowering failed (the message names the cause).
    """
    require_backend("executorch", extra="executorch", purpose="ExecuTorch export")
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    prepared = prepare_model(model, strategy=strategy, target="executorch",
                             dynamic_batch=dynamic_batch, io_spec=io_spec, input_shape=input_shape,
                             name=name)
    if dynamic_batch:
        require_dynamic_batch_support(prepared, "dynamic_batch")
    spec = prepared.io_spec
    # A batch of 1 in the example input would be specialised by torch.export (0/1 rule).
    inputs = spec.sample_inputs(batch=2 if dynamic_batch else 1)
    dims = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dims = tuple({0: batch} for _ in spec.inputs)
        params = inspect.signature(prepared.model.forward).parameters.values()
        if any(p.kind is p.VAR_POSITIONAL for p in params):  # forward(*inputs): one tuple
            dims = (dims,)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(prepared.model, inputs, dynamic_shapes=dims)
            if calibration is not None:
                layers = [n for n, m in prepared.model.named_modules()
                          if isinstance(m, ODConv2dDeploy)]
                int8_layers = static_module_names(prepared.model, layers)
                converted = quantize_program(exported, int8_layers, calibration,
                                             dynamic_batch=dynamic_batch)
                exported = torch.export.export(converted, inputs, dynamic_shapes=dims)
            total_macs, _ = conv_matmul_macs(exported.graph_module)
            edge = to_edge_transform_and_lower(exported, partitioner=[xnnpack_partitioner()])
            lowered = edge.exported_program().graph_module
            info = get_delegation_info(lowered)
            if dynamic_batch:
                _restore_batch_range(edge, max_batch)
            program = edge.to_executorch()
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"ExecuTorch lowering of {prepared.name} failed: {root_cause(exc)}"
                          ) from exc
    fallback_macs, fallback_ops = conv_matmul_macs(lowered)
    path = fspath(path)
    if calibration is not None:  # the PyTorch reference first: a .pte never lands without it
        with atomic_output(pt2e_reference_path(path), overwrite=overwrite) as tmp:
            torch.export.save(exported, str(tmp))
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(program.buffer)
        planned_batch = _planned_batch(tmp)
    if calibration is None:  # an int8 program's reference left beside this one is stale
        pt2e_reference_path(path).unlink(missing_ok=True)
    by_op = {op: {"delegated": b.delegated, "non_delegated": b.non_delegated}
             for op, b in info.delegation_by_operator.items()}
    fallen = sorted(op for op, b in by_op.items() if b["non_delegated"]
                    and op not in ("getitem", "sym_size"))
    share = 1.0 - fallback_macs / total_macs if total_macs else 1.0
    notes = []
    if dynamic_batch and planned_batch < max_batch:
        notes.append(f"ExecuTorch planned memory for batch <= {planned_batch} (asked for "
                     f"{max_batch}); larger batches are rejected by the runtime")
    if calibration is not None:
        quantized_ops = {op: b for op, b in by_op.items() if "quantize" in op}
        stuck = sorted(op for op, b in quantized_ops.items() if b["non_delegated"])
        notes.append(f"int8 in XNNPACK: {', '.join(int8_layers)} (calibrated on "
                     f"{calibration.describe()}); float: the {len(layers)} ODConv layers"
                     + (f"; quantize ops NOT delegated: {stuck}" if stuck else ""))
    if fallback_ops:
        notes.append(f"conv/matmul ops NOT delegated to XNNPACK: {dict(fallback_ops)} "
                     f"({fallback_macs / 1e6:.1f} of {total_macs / 1e6:.1f} M MACs run on "
                     "portable kernels)")
    return ExportResult(
        format=ExportFormat.EXECUTORCH, path=path,
        input_names=spec.input_names, output_names=spec.output_names,
        input_shapes=spec_shapes(spec.inputs, dynamic_batch),
        output_shapes=spec_shapes(spec.outputs, dynamic_batch),
        file_size_bytes=path_size(path),
        options={"backend": "xnnpack", "dynamic_batch": dynamic_batch, "max_batch": max_batch,
                 "strategy": prepared.strategy,
                 "layer_forms": prepared.layer_forms, "model": prepared.name,
                 "weights": INT8_STORAGE if calibration is not None
                 else weight_storage(prepared.model),
                 **({"int8_layers": int8_layers, "calibration": calibration.describe(),
                     "reference": str(pt2e_reference_path(path))} if calibration is not None
                    else {})},
        tool_versions=tool_versions("executorch"),
        op_counts={op: b["delegated"] + b["non_delegated"] for op, b in by_op.items()},
        notes=notes,
        details={
            "delegated_subgraphs": info.num_delegated_subgraphs,
            "delegated_nodes": info.num_delegated_nodes,
            "non_delegated_nodes": info.num_non_delegated_nodes,
            "non_delegated_op_types": fallen,
            "conv_matmul_macs": total_macs,
            "conv_matmul_macs_delegated_share": share,
            "max_batch_planned": planned_batch,
            "delegation_by_operator": by_op,
            "converted_layers": prepared.converted_layers,
        },
    )
