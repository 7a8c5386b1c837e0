"""Pure, differentiable foldings used by the deploy form (no module surgery here).

All functions take and return tensors; they are exact algebraic identities for eval-mode
BatchNorm (running statistics).
"""

from __future__ import annotations

import torch
from torch import nn


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y = x * scale + shift`` per channel.

    Raises:
        ValueError: The BatchNorm tracks no running statistics (it cannot be folded).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn} has no running statistics; it cannot be folded.")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def fold_bn_into_linear(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Fold ``bn(W @ p)`` into ``W' @ p + b'`` for a bias-free ``weight`` ``[A, C]``."""
    scale, shift = bn_scale_shift(bn)
    return weight * scale[:, None], shift


def stack_attention_heads(
    heads: list[tuple[torch.Tensor, torch.Tensor]], temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack head weights ``[n_i, A]`` and biases ``[n_i]`` into one matrix, with ``1/T`` folded.

    One GEMM then evaluates every head: ``logits = h @ W.T + b`` and
    ``logits / T == h @ (W / T).T + b / T``.
    """
    weight = torch.cat([w for w, _ in heads], dim=0) / temperature
    bias = torch.cat([b for _, b in heads], dim=0) / temperature
    return weight, bias


def fold_output_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor,
                                                                      torch.Tensor]:
    """Fold a BatchNorm that follows an ODConv into its kernels and a new bias.

    ``bn(a_f * conv(x, W)) == a_f * conv(x, W * s) + t`` because the filter attention and the
    BN scale are both per output channel. ``weight`` is ``[K, C_out, C_in/g, k, k]``.
    """
    scale, shift = bn_scale_shift(bn)
    return weight * scale.view(1, -1, 1, 1, 1), shift
