"""Parameter and multiply-accumulate counts, measured by running the model once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from odconv_deploy.detect import looks_like_odconv
from odconv_deploy.layers.deploy import ODConv2dDeploy
from odconv_deploy.quantize import Int8Conv2d, Int8Weight


@dataclass(frozen=True)
class Complexity:
    """Parameter count and MACs of one forward pass at batch 1.

    ``macs`` counts the multiply-accumulates of convs and linear layers, with an ODConv
    layer counted as its static conv plus its attention (pooling, trunk and heads) and the
    kernel aggregation ``K * C_out * C_in/g * k * k``, the convention of the ODConv paper.
    """

    params: int
    macs: int


def _conv_macs(out: torch.Tensor, c_in: int, k: int, groups: int) -> int:
    return out.shape[1] * (c_in // groups) * k * k * out.shape[2] * out.shape[3]


def _odconv_macs(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, ODConv2dDeploy):
        c_in, k, groups, k_num = (module.in_channels, module.kernel_size, module.groups,
                                  module.kernel_num)
        width, heads = module.attention_fc.out_features, module.attention_heads.out_features
    else:
        k_num, _, c_in_g, k, _ = module.weight.shape
        groups = module.groups
        c_in = c_in_g * groups
        width = module.attention.fc.weight.shape[0]
        heads = sum(getattr(module.attention, n).weight.shape[0]
                    for n in ("channel_fc", "filter_fc", "spatial_fc", "kernel_fc")
                    if isinstance(getattr(module.attention, n, None), nn.Module))
    c_out = out.shape[1]
    attention = c_in * x.shape[2] * x.shape[3] + c_in * width + width * heads
    aggregation = k_num * c_out * (c_in // groups) * k * k if k_num > 1 or k > 1 else 0
    return _conv_macs(out, c_in, k, groups) + attention + aggregation


def measure_complexity(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 224, 224), *,
                       inputs: Sequence[torch.Tensor] | None = None) -> Complexity:
    """Count parameters and MACs of ``model`` for one input of ``input_shape``.

    Networks with several inputs pass ``inputs`` (example tensors) instead.
    """
    total = [0]
    hooks = []
    odconv_ids = {id(m) for m in model.modules()
                  if looks_like_odconv(m) or isinstance(m, ODConv2dDeploy)}
    inside = {id(s) for m in model.modules() if id(m) in odconv_ids for s in m.modules()
              if s is not m}

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if id(module) in inside:
            return
        if id(module) in odconv_ids:
            total[0] += _odconv_macs(module, args[0], out)
        elif isinstance(module, nn.Conv2d):
            total[0] += _conv_macs(out, module.in_channels, module.kernel_size[0],
                                   module.groups)
        elif isinstance(module, Int8Conv2d):
            _, c_in_g, k, _ = module.weight_int8.q.shape
            total[0] += _conv_macs(out, c_in_g * module.groups, k, module.groups)
        elif isinstance(module, nn.Linear):
            total[0] += module.in_features * module.out_features * out.shape[:-1].numel()

    for module in model.modules():
        hooks.append(module.register_forward_hook(hook))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(*(inputs if inputs is not None else (torch.zeros(input_shape),)))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    params = sum(p.numel() for p in model.parameters()) + sum(
        m.q.numel() for m in model.modules() if isinstance(m, Int8Weight))
    return Complexity(params=params, macs=total[0])
