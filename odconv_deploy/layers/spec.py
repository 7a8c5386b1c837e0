"""What a deploy form needs from a train-time ODConv layer, read once by detection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from odconv_deploy.layers.odconv import is_depthwise


@dataclass(frozen=True)
class ODConvSpec:
    """Everything the deploy form needs from a train-time ODConv layer (tensors are views)."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    dilation: int
    groups: int
    kernel_num: int
    temperature: float
    weight: torch.Tensor  # [K, C_out, C_in/g, k, k]
    fc_weight: torch.Tensor  # [A, C_in]
    bn: nn.BatchNorm2d
    heads: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (weight [n, A], bias [n])

    @property
    def depthwise(self) -> bool:
        """Whether the layer is depthwise (``groups == C_in == C_out``)."""
        return is_depthwise(self.in_channels, self.out_channels, self.groups)

    @property
    def attention_channels(self) -> int:
        """Width ``A`` of the attention trunk."""
        return self.fc_weight.shape[0]
