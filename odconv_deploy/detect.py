"""Recognise ODConv layers by structure and parameter names, whatever their Python class.

Users paste the reference ``ODConv2d`` into their own projects (YOLO forks above all), so the
converter cannot rely on ``isinstance``. A module is an ODConv layer when it has:

- a rank-5 parameter ``weight`` ``[K, C_out, C_in/groups, k, k]``;
- a submodule ``attention`` with ``fc`` (1x1 conv, no bias), ``bn`` (BatchNorm2d) and
  ``channel_fc``; optional ``filter_fc``, ``spatial_fc``, ``kernel_fc`` heads;
- conv attributes ``stride``, ``padding``, ``dilation``, ``groups``.

The absence of a head means that attention is 1, exactly as in the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from odconv_deploy.errors import UnsupportedLayerError
from odconv_deploy.layers.odconv import as_square
from odconv_deploy.layers.spec import ODConvSpec

HEAD_NAMES = ("channel_fc", "filter_fc", "spatial_fc", "kernel_fc")


def looks_like_odconv(module: nn.Module) -> bool:
    """Whether ``module`` has the reference ODConv structure (cheap, no validation)."""
    weight = getattr(module, "weight", None)
    attention = getattr(module, "attention", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 5
        and isinstance(attention, nn.Module)
        and isinstance(getattr(attention, "fc", None), nn.Module)
        and isinstance(getattr(attention, "bn", None), nn.BatchNorm2d)
        and isinstance(getattr(attention, "channel_fc", None), nn.Module)
    )


def _head_tensors(head: nn.Module, name: str, width: int, layer: str) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    weight = getattr(head, "weight", None)
    bias = getattr(head, "bias", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        raise UnsupportedLayerError(
            f"{layer}: attention.{name} has no weight and bias; expected a 1x1 Conv2d with bias."
        )
    weight = weight.reshape(weight.shape[0], -1)
    if weight.shape[1] != width:
        raise UnsupportedLayerError(
            f"{layer}: attention.{name}.weight has {weight.shape[1]} inputs; the attention "
            f"trunk (attention.fc) has {width} channels."
        )
    return weight, bias


def inspect_odconv(module: nn.Module, name: str = "") -> ODConvSpec:
    """Read an ODConv layer's configuration and tensors by structure.

    Args:
        module: A module for which :func:`looks_like_odconv` is true.
        name: Its qualified name in the model, used in error messages.

    Returns:
        The layer's :class:`ODConvSpec`.

    Raises:
        UnsupportedLayerError: The structure is ODConv-like but a setting is not supported or
            the shapes are inconsistent (the message names the layer and the field).
    """
    layer = name or type(module).__name__
    if not looks_like_odconv(module):
        raise UnsupportedLayerError(f"{layer}: {type(module).__name__} is not an ODConv layer.")
    attention = module.attention
    weight = module.weight
    kernel_num, out_channels, in_per_group, k_h, k_w = weight.shape
    if k_h != k_w:
        raise UnsupportedLayerError(f"{layer}: kernel {k_h}x{k_w} is not square.")
    missing = [a for a in ("stride", "padding", "dilation", "groups") if not hasattr(module, a)]
    if missing:
        raise UnsupportedLayerError(
            f"{layer}: ODConv-like layer lacks the attributes {missing}. "
            "Note: the converter reads stride, padding, dilation and groups from the layer."
        )
    if isinstance(module.padding, str):
        raise UnsupportedLayerError(
            f"{layer}: padding={module.padding!r} is not supported; expected an int."
        )
    if getattr(module, "padding_mode", "zeros") != "zeros":
        raise UnsupportedLayerError(
            f"{layer}: padding_mode={module.padding_mode!r}; only 'zeros' is supported."
        )
    groups = int(module.groups)
    fc_weight = attention.fc.weight.reshape(attention.fc.weight.shape[0], -1)
    if getattr(attention.fc, "bias", None) is not None:
        raise UnsupportedLayerError(f"{layer}: attention.fc has a bias; the reference has none.")
    in_channels = fc_weight.shape[1]
    if in_per_group * groups != in_channels:
        raise UnsupportedLayerError(
            f"{layer}: weight expects {in_per_group} x groups={groups} input channels but "
            f"attention.fc takes {in_channels}."
        )
    width = fc_weight.shape[0]
    heads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    expected = {"channel_fc": in_channels, "filter_fc": out_channels,
                "spatial_fc": k_h * k_w, "kernel_fc": kernel_num}
    for head_name in HEAD_NAMES:
        head = getattr(attention, head_name, None)
        if not isinstance(head, nn.Module):
            continue
        w, b = _head_tensors(head, head_name, width, layer)
        if w.shape[0] != expected[head_name]:
            raise UnsupportedLayerError(
                f"{layer}: attention.{head_name} has {w.shape[0]} outputs; "
                f"expected {expected[head_name]}."
            )
        heads[head_name] = (w, b)
    temperature = getattr(attention, "temperature", 1.0)
    temperature = float(temperature.item() if isinstance(temperature, torch.Tensor)
                        else temperature)
    if not temperature > 0:
        raise UnsupportedLayerError(f"{layer}: temperature={temperature} must be > 0.")
    geometry = {"stride": as_square(module.stride, "stride", layer),
                "padding": as_square(module.padding, "padding", layer),
                "dilation": as_square(module.dilation, "dilation", layer), "groups": groups}
    for what, low in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)):
        if geometry[what] < low:
            raise UnsupportedLayerError(f"{layer}: {what}={geometry[what]} must be >= {low}.")
    return ODConvSpec(
        name=name,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=k_h,
        stride=geometry["stride"],
        padding=geometry["padding"],
        dilation=geometry["dilation"],
        groups=groups,
        kernel_num=kernel_num,
        temperature=temperature,
        weight=weight,
        fc_weight=fc_weight,
        bn=attention.bn,
        heads=heads,
    )
