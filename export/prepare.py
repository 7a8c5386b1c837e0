"""Preparing a model for tracing: conversion if needed, the I/O spec, batch-mode checks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from export.result import ExportError
from odconv_deploy.io_spec import IOSpec, TensorSpec
from odconv_deploy.layers.deploy import DEFAULT_STRATEGY, ODConv2dDeploy
from odconv_deploy.layers.ort_nchwc import OrtNchwcODConv2d
from odconv_deploy.model_source import ModelSourceError, describe_io
from odconv_deploy.reparameterize import convert_model, find_odconv_layers
from odconv_deploy.strategy_choice import AUTO_STRATEGY, TUNE_STRATEGY, canonical_target


@dataclass
class PreparedModel:
    """A deploy-form model ready to trace, its I/O spec and how it was obtained."""

    model: nn.Module
    io_spec: IOSpec
    name: str
    strategy: str | None  # None when the model has no ODConv layer; "auto", "mixed" possible
    converted_layers: int
    #: Deploy form -> number of layers that use it.
    layer_forms: dict[str, int] = field(default_factory=dict)


def resolve_io_spec(model: nn.Module, io_spec: IOSpec | None,
                    input_shape: tuple[int, ...] | None) -> IOSpec:
    """The I/O spec to export with: given, else ``input_shape``, else ``model.io_spec``."""
    if io_spec is not None:
        return io_spec
    if input_shape is not None:
        if len(input_shape) < 2:
            raise ExportError(f"input_shape={input_shape} must include the batch axis.")
        shape = (1,) + tuple(input_shape[1:])
        return IOSpec(inputs=(TensorSpec("input", shape),), outputs=(TensorSpec("output", ()),),
                      mean=None, std=None, task="generic")
    spec = getattr(model, "io_spec", None)
    if isinstance(spec, IOSpec):
        return spec
    raise ExportError(
        f"{type(model).__name__} declares no io_spec. Note: pass input_shape=(1, C, H, W) "
        "(CLI: --input-shape) or an IOSpec."
    )


def prepare_model(model: nn.Module, *, strategy: str | None = None, target: str = "onnx",
                  dynamic_batch: bool = True, io_spec: IOSpec | None = None,
                  input_shape: tuple[int, ...] | None = None, name: str | None = None
                  ) -> PreparedModel:
    """Convert a train-form model to its deploy form (if needed) and check that it runs.

    Args:
        model: Train form or deploy form (any network with ODConv layers, or none).
        strategy: Deploy strategy for train-form layers (default: ``im2col``), or ``auto``.
        target: The export target ``auto`` chooses for.
        dynamic_batch: Whether the export keeps the batch dynamic (``auto`` needs to know).
        io_spec: The model's I/O contract (default: ``model.io_spec`` or ``input_shape``).
        input_shape: Input shape for models without an ``io_spec``.
        name: Name stamped into the artifacts (default: the zoo name or the class name).

    Raises:
        ExportError: The model does not run on its declared input, or returns something other
            than tensors.
    """
    target = canonical_target(target)
    spec = resolve_io_spec(model, io_spec, input_shape)
    name = name or getattr(model, "zoo_name", None) or type(model).__name__
    converted = 0
    if find_odconv_layers(model):
        result = convert_model(model, strategy=strategy or DEFAULT_STRATEGY, target=target,
                               dynamic_batch=dynamic_batch)
        model, converted = result.model, len(result.layers)
        strategy = result.strategy
    else:
        strategies = {m.form for m in model.modules() if isinstance(m, ODConv2dDeploy)}
        per_layer = (AUTO_STRATEGY, TUNE_STRATEGY)  # the caller's conversion chose the forms
        if strategy not in (None, *per_layer) and strategies and strategies != {strategy}:
            raise ExportError(
                f"The model is already in deploy form with strategy {sorted(strategies)}, not "
                f"{strategy!r}. Note: pass the train-form model to choose the strategy."
            )
        if strategy not in per_layer or not strategies:
            strategy = (None if not strategies else next(iter(strategies))
                        if len(strategies) == 1 else "mixed")
    layer_forms = dict(Counter(m.form for m in model.modules()
                                    if isinstance(m, ODConv2dDeploy)))
    if target not in ("onnx", "onnxruntime") and OrtNchwcODConv2d.form in layer_forms:
        raise ExportError(
            f"{name} has {OrtNchwcODConv2d.form!r} layers, which only ONNX Runtime runs "
            f"(its NCHWc CPU kernels); {target} cannot. Note: pass the train-form model "
            "with strategy='auto' to choose each layer's form for this target.")
    try:  # runs the model once and names its outputs (a dict-returning one gets wrapped)
        model, spec = describe_io(model.eval(), name, spec, None)
    except ModelSourceError as exc:
        raise ExportError(str(exc)) from exc
    return PreparedModel(model, spec, name, strategy, converted, layer_forms)


def nchwc_block_of(model: nn.Module) -> int | None:
    """The NCHWc block the model's ``ort_nchwc`` layers are laid out for, or None if none.

    Raises:
        ExportError: Layers laid out for different blocks (no CPU runs both).
    """
    blocks = {m.block for m in model.modules() if isinstance(m, OrtNchwcODConv2d)}
    if len(blocks) > 1:
        raise ExportError(f"The model's ort_nchwc layers are laid out for different NCHWc "
                          f"blocks {sorted(blocks)}; one graph runs on one block. Note: "
                          "convert all layers for the same block.")
    return next(iter(blocks), None)


def format_layer_forms(layer_forms: dict[str, int]) -> str:
    """``"dynamic_weight:17,im2col:35"`` (sorted), or ``"none"``: for artifact metadata."""
    return ",".join(f"{k}:{v}" for k, v in sorted(layer_forms.items())) or "none"


def require_dynamic_batch_support(prepared: PreparedModel, option: str) -> None:
    """Refuse a dynamic batch when a deploy layer bakes the batch into exported graphs.

    Args:
        prepared: The prepared model.
        option: The exporter's argument that turns the dynamic batch off (for the message).

    Raises:
        ExportError: Some layer's form cannot take a dynamic batch.
    """
    fixed = sorted({m.form for m in prepared.model.modules()
                    if isinstance(m, ODConv2dDeploy) and not m.supports_dynamic_batch})
    if fixed:
        raise ExportError(
            f"The {fixed[0]!r} form bakes the batch into exported graphs, so a "
            f"dynamic batch is impossible. Note: pass {option}=False (CLI: --fixed-batch N) "
            "or use the 'im2col' or 'static_weight' strategy."
        )


def check_batch_size(batch_size: int, dynamic_batch: bool) -> None:
    """Refuse a fixed batch size that is not a positive int, or one given with a dynamic batch."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExportError(f"batch_size must be a positive int, got {batch_size!r}.")
    if dynamic_batch and batch_size != 1:
        raise ExportError(
            f"batch_size={batch_size} fixes the batch, but dynamic_batch=True asks for any "
            "batch. Note: pass dynamic_batch=False (CLI: --fixed-batch N) to bake it in."
        )
