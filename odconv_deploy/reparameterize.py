"""Convert every ODConv layer of any model to its deploy form: one exact, verified conversion.

Layers are found by structure (:mod:`odconv_deploy.detect`), so reference-style layers pasted
into users' networks convert too. A BatchNorm2d that directly follows an ODConv layer (its only
consumer, found with torch.fx) is folded into it and replaced by ``nn.Identity``. Each converted
layer is checked against the original in float64 on random input before it is swapped in.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from odconv_deploy.detect import inspect_odconv, looks_like_odconv
from odconv_deploy.errors import ConversionError, UnsupportedLayerError
from odconv_deploy.layers import DEFAULT_STRATEGY, LAYER_FORMS, ODConv2dDeploy
from odconv_deploy.layers.spec import ODConvSpec
from odconv_deploy.strategy_choice import (
    AUTO_STRATEGY,
    TUNE_STRATEGY,
    AutoStrategy,
    check_strategy_name,
)
from odconv_deploy.tolerance import allowed_error, within_tolerance

#: Relative tolerance of the float64 per-layer check (the rewrite is an exact identity).
VERIFY_RTOL = 1e-9


@dataclass(frozen=True)
class LayerConversion:
    """What happened to one ODConv layer."""

    name: str
    form: str
    folded_bn: str | None
    max_abs_error: float | None  # float64 check; None when verification was off
    reference_scale: float | None


@dataclass
class ConversionResult:
    """A converted model and the record of each layer's conversion."""

    model: nn.Module
    strategy: str  # a deploy form, or "auto" (each layer's choice is in ``layers``)
    layers: list[LayerConversion] = field(default_factory=list)
    #: The float32 deploy model ``model`` was quantized from (None: ``model`` is float).
    float_model: nn.Module | None = None

    @property
    def float_deploy(self) -> nn.Module:
        """The float32 deploy model: ``float_model`` when quantized, else ``model``."""
        return self.model if self.float_model is None else self.float_model

    @property
    def layer_forms(self) -> dict[str, int]:
        """How many layers took each deploy form."""
        return dict(Counter(layer.form for layer in self.layers))

    @property
    def folded_bn_count(self) -> int:
        """How many BatchNorms were folded into ODConv layers."""
        return sum(layer.folded_bn is not None for layer in self.layers)


def find_odconv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Qualified names and modules of the train-form ODConv layers in ``model``."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, ODConv2dDeploy):
            continue
        if looks_like_odconv(module) and not any(name.startswith(f"{n}.") for n, _ in found):
            found.append((name, module))
    return found


class _LeafTracer(fx.Tracer):
    """FX tracer that keeps ODConv layers opaque."""

    def __init__(self, leaves: set[int]) -> None:
        super().__init__()
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # noqa: D102
        return id(m) in self._leaves or super().is_leaf_module(m, qualname)


def _bn_after_odconv(root: nn.Module, prefix: str, leaves: set[int]) -> dict[str, str] | None:
    """``{odconv name: bn name}`` for BNs that are the sole consumer of an ODConv in ``root``.

    Returns None when ``root`` cannot be traced symbolically.
    """
    try:
        graph = _LeafTracer(leaves).trace(root)
    except Exception:  # noqa: BLE001 - user forward code may not be traceable; try children
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or id(root.get_submodule(node.target)) not in leaves:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args[0] is not node:
            continue
        bn = root.get_submodule(users[0].target)
        if (type(bn) is nn.BatchNorm2d and bn.running_mean is not None
                and calls[users[0].target] == 1 and len(users[0].args) == 1):
            pairs[prefix + node.target] = prefix + users[0].target
    return pairs


def find_following_batchnorms(model: nn.Module, odconv_names: list[str]) -> dict[str, str]:
    """Map ODConv layer names to the BatchNorm2d that directly and solely consumes each output.

    Traces the whole model with torch.fx; where user code is not traceable, traces each child
    instead, so untraceable top-level code only costs the folds inside it.
    """
    leaves = {id(model.get_submodule(n)) for n in odconv_names}

    def visit(module: nn.Module, prefix: str) -> dict[str, str]:
        if id(module) in leaves:
            return {}
        pairs = _bn_after_odconv(module, prefix, leaves)
        if pairs is not None:
            return pairs
        found: dict[str, str] = {}
        for child_name, child in module.named_children():
            found.update(visit(child, f"{prefix}{child_name}."))
        return found

    return visit(model, "")


def _random_input(spec_in: int, kernel: int, dilation: int, stride: int, dtype: torch.dtype,
                  generator: torch.Generator) -> torch.Tensor:
    """A small non-square input the layer accepts, with values of both signs."""
    base = dilation * (kernel - 1) + 1
    height, width = base + 2 * stride + 1, base + 3 * stride
    return torch.randn(3, spec_in, height, width, dtype=dtype, generator=generator)


def verify_layer(original: nn.Module, bn: nn.Module | None, deploy: ODConv2dDeploy,
                 name: str, *, rtol: float = VERIFY_RTOL) -> tuple[float, float]:
    """Check that the conversion of ``original`` (+ ``bn``) into ``deploy`` is exact.

    The conversion is redone on float64 copies and compared on a random input, so rounding
    of a float32 model cannot hide (or fake) an algebra error; then ``deploy`` itself is
    compared with the original in its own dtype at that dtype's precision.

    Returns:
        ``(max_abs_error, reference_scale)`` of the float64 check.

    Raises:
        ConversionError: The float64 error exceeds ``rtol * max(1, max|reference|)``, or the
            converted layer disagrees with the original beyond its dtype's precision.
    """
    ref_layer = copy.deepcopy(original).double().eval()
    ref_bn = copy.deepcopy(bn).double().eval() if bn is not None else None
    twin = type(deploy).from_spec(inspect_odconv(ref_layer, name), output_bn=ref_bn).eval()
    gen = torch.Generator().manual_seed(0)
    x = _random_input(deploy.in_channels, deploy.kernel_size, deploy.dilation, deploy.stride,
                      torch.float64, gen)
    with torch.no_grad():
        expected = ref_layer(x)
        if ref_bn is not None:
            expected = ref_bn(expected)
        actual = twin(x)
    if actual.shape != expected.shape:
        raise ConversionError(
            f"{name}: deploy form gives shape {tuple(actual.shape)}, the original "
            f"{tuple(expected.shape)} for input {tuple(x.shape)}."
        )
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    if not within_tolerance(error, scale, rtol=rtol, atol=rtol):
        raise ConversionError(
            f"{name}: deploy form ({deploy.form}) differs from the original layer by "
            f"max |err| = {error:.3e} (reference max |y| = {scale:.3e}, allowed "
            f"{rtol:g} relative) in float64. Note: the layer has the ODConv structure but "
            f"its forward computes something else; it cannot be converted exactly."
        )
    dtype = deploy.weight.dtype
    with torch.no_grad():
        own = deploy(x.to(dtype)).double()
    own_error = (own - expected).abs().max().item()
    own_rtol = 1e3 * torch.finfo(dtype).eps
    own_tol = allowed_error(scale, rtol=own_rtol, atol=own_rtol)
    if not own_error <= own_tol:
        raise ConversionError(
            f"{name}: converted {dtype} layer differs from the original by {own_error:.3e} "
            f"(allowed {own_tol:.1e} for {dtype})."
        )
    return error, scale


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert_model(
    model: nn.Module,
    *,
    strategy: str = DEFAULT_STRATEGY,
    target: str = "onnx",
    dynamic_batch: bool = True,
    inplace: bool = False,
    fold_bn: bool = True,
    verify: bool = True,
    plan: Sequence[str] | None = None,
) -> ConversionResult:
    """Replace every ODConv layer with its deploy form and report what was done.

    Args:
        model: Any module containing ODConv layers (or one ODConv layer).
        strategy: Deploy strategy, one of ``DEPLOY_STRATEGIES``, or ``"auto"`` to choose per
            layer for ``target`` (:mod:`odconv_deploy.strategy_choice`).
        target: Export target ``auto`` chooses for (``onnx``, ``ort``, ``coreml``, ``pte``,
            ``torch``); ignored by a named strategy.
        dynamic_batch: Whether ``auto`` must keep the batch dynamic; ignored by a named
            strategy.
        inplace: Modify ``model`` itself instead of a deep copy.
        fold_bn: Fold a BatchNorm2d that directly follows an ODConv layer into it.
        verify: Check every converted layer against the original in float64.
        plan: One deploy form per ODConv layer, in layer order (a tuned plan); overrides
            ``strategy``'s choice, and is verified like any other.

    Returns:
        The converted model (in eval mode) and a per-layer record.

    Raises:
        UnsupportedLayerError: Unknown strategy or target, or an unsupported layer setting.
        ConversionError: A converted layer does not reproduce its original.
    """
    check_strategy_name(strategy)
    auto = AutoStrategy(target, dynamic_batch) if strategy in (AUTO_STRATEGY, TUNE_STRATEGY) \
        else None
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    layers = find_odconv_layers(model)
    planned = dict(zip((n for n, _ in layers), plan, strict=True)) if plan is not None else {}
    if plan is not None and (unknown := sorted(set(plan) - set(LAYER_FORMS))):
        raise UnsupportedLayerError(f"plan names unknown deploy forms {unknown}; the forms are "
                                    f"{sorted(LAYER_FORMS)}.")

    def deploy_form(name: str, spec: ODConvSpec, bn: nn.Module | None) -> ODConv2dDeploy:
        chosen = planned.get(name) or (auto.choose(spec) if auto else strategy)
        return LAYER_FORMS[chosen].from_spec(spec, output_bn=bn).eval()

    if layers and layers[0][0] == "":  # the model is itself one ODConv layer
        spec = inspect_odconv(model, type(model).__name__)
        deploy = deploy_form("", spec, None)
        err = verify_layer(model, None, deploy, spec.name) if verify else (None, None)
        return ConversionResult(deploy, strategy,
                                [LayerConversion(spec.name, deploy.form, None, *err)])
    bn_for = find_following_batchnorms(model, [n for n, _ in layers]) if fold_bn else {}
    result = ConversionResult(model, strategy)
    for name, layer in layers:
        spec = inspect_odconv(layer, name)
        bn_name = bn_for.get(name)
        bn = model.get_submodule(bn_name) if bn_name else None
        deploy = deploy_form(name, spec, bn)
        err = verify_layer(layer, bn, deploy, name) if verify else (None, None)
        _set_submodule(model, name, deploy)
        if bn_name:
            _set_submodule(model, bn_name, nn.Identity())
        result.layers.append(LayerConversion(name, deploy.form, bn_name, *err))
    return result


def reparameterize_model(
    model: nn.Module,
    *,
    strategy: str = DEFAULT_STRATEGY,
    target: str = "onnx",
    dynamic_batch: bool = True,
    inplace: bool = False,
    fold_bn: bool = True,
    verify: bool = True,
) -> nn.Module:
    """Return ``model`` with every ODConv layer replaced by its exact deploy form.

    Converting twice is a no-op (deploy forms are skipped). The input model is left untouched
    unless ``inplace=True``. See :func:`convert_model` for the arguments and a per-layer report.
    """
    return convert_model(model, strategy=strategy, target=target, dynamic_batch=dynamic_batch,
                         inplace=inplace, fold_bn=fold_bn, verify=verify).model
