"""CoreML export (coremltools, mlprogram): flexible batch, fp16/fp32, metadata, rank check."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from export.prepare import format_layer_forms, prepare_model, require_dynamic_batch_support
from export.result import (
    ExportError,
    ExportFormat,
    ExportResult,
    fspath,
    path_size,
    root_cause,
    spec_shapes,
    tool_versions,
)
from odconv_deploy._atomic import atomic_output
from odconv_deploy.errors import require_backend
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.quantize import (
    LUT_BITS,
    has_int8_banks,
    has_palettized_banks,
    weight_storage,
)

PRECISIONS = ("fp16", "fp32")
DEPLOYMENT_TARGETS = ("iOS15", "iOS16", "iOS17", "iOS18")
#: The first deployment target whose opset coremltools quantizes a constant bank in.
INT8_BANK_TARGET = "iOS17"
#: Palettized banks (``lut6w``): ``constexpr_lut_to_dense`` exists from iOS16 on.
LUT_BANK_TARGET = "iOS16"
#: CoreML rejects tensors above this rank.
MAX_COREML_RANK = 5


def iter_mil_ops(program: object) -> Iterator[object]:
    """Every operation of a MIL program, nested blocks included."""

    def walk(block: object) -> Iterator[object]:
        for op in block.operations:
            yield op
            for inner in getattr(op, "blocks", []) or []:
                yield from walk(inner)

    for function in program.functions.values():
        yield from walk(function)


def check_mil_program(program: object) -> dict[str, object]:
    """Facts about a converted MIL program that deployment depends on.

    Returns:
        ``max_rank`` (largest tensor rank), ``conv_groups`` (groups of each conv) and
        ``batch_dependent_convs`` (convs whose channel dims are symbolic, i.e. whose group
        count would have to follow the batch size, as in the reference layer).
    """
    max_rank, groups, suspicious = 0, [], []
    for op in iter_mil_ops(program):
        for var in op.outputs:
            if var.shape is not None:
                max_rank = max(max_rank, len(var.shape))
        if op.op_type == "conv":
            g = op.inputs["groups"].val if "groups" in op.inputs else 1
            groups.append(int(g))
            channels = op.inputs["x"].shape[1]
            if not isinstance(channels, int):
                suspicious.append(op.name)
    return {"max_rank": max_rank, "conv_groups": groups, "batch_dependent_convs": suspicious}


#: The graph pass appended to coremltools' default pipeline (see :func:`_pass_pipeline`).
ZERO_BIAS_PASS = "odconv::drop_zero_linear_bias"


def _pass_pipeline(ct: object) -> object:
    """The default coremltools pass pipeline, plus one that drops all-zero ``linear`` biases.

    The PyTorch frontend gives every bias-less ``linear`` a zero bias constant as long as its
    output: for the kernel aggregation (one ``linear`` over the bank, ``C_out*C_in/g*k*k``
    outputs) that is a bank row's worth of zeros per layer, 18.8 MB of od_resnet18 k=4's
    fp32 package. The pass makes each such ``linear`` a ``matmul`` with the weight
    transposed, which has no bias (MIL's ``linear`` fills a missing one with zeros).
    """
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

    if ZERO_BIAS_PASS not in PASS_REGISTRY:
        class drop_zero_linear_bias(AbstractGraphPass):  # noqa: N801 - coremltools' naming
            def apply(self, prog: object) -> None:
                for function in prog.functions.values():
                    self._block(function)

            @block_context_manager
            def _block(self, block: object) -> None:
                for op in list(block.operations):
                    for inner in op.blocks:
                        self._block(inner)
                    bias = op.inputs.get("bias") if op.op_type == "linear" else None
                    if bias is None or bias.val is None or np.any(bias.val):
                        continue
                    # MIL's linear fills a missing bias with zeros again: a matmul has none
                    new = mb.matmul(x=op.inputs["x"], y=op.inputs["weight"], transpose_y=True,
                                    before_op=op)
                    if block.try_replace_uses_of_var_after_op(anchor_op=op,
                                                              old_var=op.outputs[0],
                                                              new_var=new):
                        block.remove_ops([op])

        register_pass(namespace="odconv")(drop_zero_linear_bias)
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.append_pass(ZERO_BIAS_PASS)
    return pipeline


def _palettize_losslessly(ct: object, mlmodel: object, nbits: int) -> object:
    """Every constant with at most ``2**nbits`` distinct values stored as a lookup table.

    The palettized banks take that many values by construction
    (:func:`odconv_deploy.quantize.palettize_kernel_banks`), so coremltools' ``unique`` mode
    stores them exactly: the artifact computes what the palettized PyTorch model does.
    """
    import coremltools.optimize.coreml as cto

    meta = cto.get_weights_metadata(mlmodel, weight_threshold=2 ** nbits)
    names = [name for name, m in meta.items() if m.unique_values <= 2 ** nbits]
    if not names:
        raise ExportError("No constant of the Core ML program has the palettized banks' "
                          f"{2 ** nbits} values (a conversion changed them?). Note: export in "
                          "fp32 and report this with the model.")
    config = cto.OptimizationConfig(op_name_configs={
        name: cto.OpPalettizerConfig(mode="unique", weight_threshold=1) for name in names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cto.palettize_weights(mlmodel, config)


def export_coreml(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    precision: str = "fp16",
    minimum_deployment_target: str | None = None,
    flexible_batch: bool = True,
    max_batch: int = 64,
    strategy: str | None = None,
    io_spec: IOSpec | None = None,
    input_shape: tuple[int, ...] | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Convert a model (train form converted automatically) to a CoreML ``.mlpackage``.

    Converts on Linux too; the program is checked to contain no tensor of rank > 5 and no
    conv whose channel count (hence group count) depends on the batch.

    Args:
        model: Zoo model, user network with ODConv layers, or a deploy-form model.
        path: Output ``.mlpackage`` folder.
        precision: ``"fp16"`` (default; what the Neural Engine runs) or ``"fp32"``.
        minimum_deployment_target: ``"iOS15"`` .. ``"iOS18"`` (default iOS15, or iOS17 for
            a model with int8 kernel banks, the first opset coremltools stores them int8 in).
        flexible_batch: Batch as a RangeDim ``1..max_batch`` (needs a batch-agnostic strategy).
        max_batch: Upper bound of the flexible batch.
        strategy: Deploy strategy for train-form ODConv layers (default ``im2col``).
        io_spec: I/O names and shapes (default: ``model.io_spec``).
        input_shape: Input shape for models without an ``io_spec``.
        name: Model name stamped into the metadata.
        overwrite: Replace an existing package.

    Raises:
        ExportError: Bad option, conversion failure, or a program that breaks CoreML's limits.
    """
    ct = require_backend("coremltools", extra="coreml", purpose="CoreML export")
    if precision not in PRECISIONS:
        raise ExportError(f"Unknown precision {precision!r}; expected one of {PRECISIONS}.")
    int8_banks, lut_banks = has_int8_banks(model), has_palettized_banks(model)
    needed = INT8_BANK_TARGET if int8_banks else LUT_BANK_TARGET if lut_banks else "iOS15"
    if minimum_deployment_target is None:
        minimum_deployment_target = needed
    if minimum_deployment_target not in DEPLOYMENT_TARGETS:
        raise ExportError(f"Unknown deployment target {minimum_deployment_target!r}; expected "
                          f"one of {DEPLOYMENT_TARGETS}.")
    if DEPLOYMENT_TARGETS.index(minimum_deployment_target) < DEPLOYMENT_TARGETS.index(needed):
        kind = "int8" if int8_banks else "palettized"
        raise ExportError(
            f"{kind} kernel banks need minimum_deployment_target {needed} or later "
            f"(coremltools makes them constexpr ops from that opset on); got "
            f"{minimum_deployment_target}. Note: leave the target unset, or export in fp32.")
    prepared = prepare_model(model, strategy=strategy, target="coreml",
                             dynamic_batch=flexible_batch, io_spec=io_spec,
                             input_shape=input_shape, name=name)
    if flexible_batch:
        require_dynamic_batch_support(prepared, "flexible_batch")
    spec = prepared.io_spec
    inputs = spec.sample_inputs(batch=1)
    batch_dim = ct.RangeDim(1, max_batch, default=1) if flexible_batch else 1
    ct_inputs = [ct.TensorType(name=t.name, shape=ct.Shape((batch_dim,) + tuple(t.shape[1:])))
                 for t in spec.inputs]
    ct_outputs = [ct.TensorType(name=t.name) for t in spec.outputs]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(prepared.model, inputs)
            mlmodel = ct.convert(
                traced, inputs=ct_inputs, outputs=ct_outputs, convert_to="mlprogram",
                minimum_deployment_target=getattr(ct.target, minimum_deployment_target),
                compute_precision=(ct.precision.FLOAT16 if precision == "fp16"
                                   else ct.precision.FLOAT32),
                pass_pipeline=_pass_pipeline(ct),
            )
    except Exception as exc:
        raise ExportError(f"CoreML conversion of {prepared.name} failed: {root_cause(exc)}"
                          ) from exc
    if lut_banks:
        mlmodel = _palettize_losslessly(ct, mlmodel, LUT_BITS)
    facts = check_mil_program(mlmodel._mil_program)
    if facts["max_rank"] > MAX_COREML_RANK or facts["batch_dependent_convs"]:
        raise ExportError(
            f"CoreML program of {prepared.name} breaks CoreML's limits: max tensor rank "
            f"{facts['max_rank']} (limit {MAX_COREML_RANK}), batch-dependent convs "
            f"{facts['batch_dependent_convs'][:5]}."
        )
    versions = tool_versions("coremltools")
    mlmodel.author = "odconv-deploy"
    mlmodel.short_description = (f"{prepared.name}, ODConv deploy strategy "
                                 f"{prepared.strategy or 'none'}, {precision}")
    mlmodel.version = versions["odconv_deploy"]
    for t in spec.inputs:
        mlmodel.input_description[t.name] = (
            f"{t.name} [batch, {', '.join(map(str, t.shape[1:]))}] float32"
            + (f", normalised with mean {spec.mean} and std {spec.std}" if spec.mean else ""))
    for t in spec.outputs:
        mlmodel.output_description[t.name] = f"{t.name} {list(t.shape[1:])} per sample"
    mlmodel.user_defined_metadata.update(
        {"model": prepared.name, "strategy": prepared.strategy or "none",
         "layer_strategies": format_layer_forms(prepared.layer_forms),
         "precision": precision, "weights": weight_storage(prepared.model),
         **{f"version.{k}": v for k, v in versions.items()}})
    path = fspath(path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        mlmodel.save(str(tmp))
    ops = Counter(op.op_type for op in iter_mil_ops(mlmodel._mil_program))
    return ExportResult(
        format=ExportFormat.COREML, path=path,
        input_names=spec.input_names, output_names=spec.output_names,
        input_shapes=spec_shapes(spec.inputs, flexible_batch),
        output_shapes=spec_shapes(spec.outputs, flexible_batch),
        file_size_bytes=path_size(path),
        options={"precision": precision, "weights": weight_storage(prepared.model),
                 "minimum_deployment_target": minimum_deployment_target,
                 "flexible_batch": flexible_batch, "max_batch": max_batch,
                 "strategy": prepared.strategy,
                 "layer_forms": prepared.layer_forms, "model": prepared.name},
        tool_versions=versions, op_counts=dict(ops),
        details={"max_rank": facts["max_rank"], "convs": len(facts["conv_groups"]),
                 "converted_layers": prepared.converted_layers},
        notes=["CoreML predictions need macOS; on Linux use the MIL reference executor "
               "(odconv_deploy validation) to check the numbers."],
    )
