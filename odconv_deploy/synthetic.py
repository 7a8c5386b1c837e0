"""Deterministic, non-trivial weights for models that have no checkpoint (demos, tests).

Fresh initialisations hide bugs: BatchNorms are identities, attention heads have zero bias,
sigmoids sit near 0.5. These helpers give every such parameter a seeded, non-trivial value.
"""

from __future__ import annotations

import torch
from torch import nn

from odconv_deploy.detect import looks_like_odconv


def randomize_batchnorms(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=generator) * 0.8 + 0.6)
                    m.bias.copy_(torch.randn(n, generator=generator) * 0.2)


def randomize_attention(model: nn.Module, generator: torch.Generator, *, scale: float = 1.0
                        ) -> None:
    """Perturb ODConv attention heads so softmaxes are peaky and sigmoids far from 0.5."""
    with torch.no_grad():
        for m in model.modules():
            if not looks_like_odconv(m):
                continue
            for name in ("channel_fc", "filter_fc", "spatial_fc", "kernel_fc"):
                head = getattr(m.attention, name, None)
                if isinstance(head, nn.Module):
                    head.bias.copy_(torch.randn(head.bias.shape, generator=generator) * scale)
                    head.weight.mul_(1.0 + scale)


def synthesize_weights(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Fill ``model`` with deterministic, non-trivial weights and return it (in eval mode).

    Every parameter is drawn from one seeded generator in registration order (weights scaled
    by fan-in, vectors such as a classifier's bias small), then BatchNorm statistics and
    attention heads are randomised with it, so the same ``seed`` gives the same model in any
    process.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                fan_in = p[0].numel() if p.dim() != 5 else p[0, 0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            else:  # left at PyTorch's unseeded init, a bias differed between processes
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    randomize_batchnorms(model, generator)
    randomize_attention(model, generator)
    return model.eval()
