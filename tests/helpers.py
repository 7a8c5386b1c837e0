"""Shared test helpers: aggressive randomisation that makes fusion bugs visible."""

import torch
from torch import nn

from odconv_deploy.detect import looks_like_odconv


def randomize_odconv(module: nn.Module, *, seed: int = 0, temperature: float = 1.7) -> nn.Module:
    """Randomise BN stats, affine params and attention heads (peaky softmax, sigmoids far
    from 0.5) of every ODConv layer and BatchNorm in ``module``; set T != 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) * 3 + 0.2)
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen))
            if looks_like_odconv(m):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
                for name in ("fc", "channel_fc", "filter_fc", "spatial_fc", "kernel_fc"):
                    head = getattr(m.attention, name, None)
                    if isinstance(head, nn.Module):
                        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 2)
                        if head.bias is not None:
                            head.bias.copy_(torch.randn(head.bias.shape, generator=gen) * 3)
                m.attention.temperature = temperature
    return module


def attention_spread(layer: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(max kernel-attention weight, mean |sigmoid - 0.5|) of a train-form layer on ``x``:
    evidence that the randomisation produced peaky, non-trivial attentions."""
    att = layer.attention(x)
    peak = att.kernel.max().item() if att.kernel is not None else 1.0
    return peak, (att.channel - 0.5).abs().mean().item()
