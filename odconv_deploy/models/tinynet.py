"""TinyNet: a small ODConv classifier for quick runs, tests and the trained digits model.

Covers every ODConv geometry the zoo uses (3x3 strided, depthwise, 1x1 expand/project,
kernel_num > 1) at a size that exports and lowers in seconds.
"""

from __future__ import annotations

import torch
from torch import nn

from odconv_deploy.io_spec import IOSpec, image_classifier_spec
from odconv_deploy.layers.odconv import DEFAULT_REDUCTION
from odconv_deploy.models.resnet import ConvFactory, odconv_factory, static_conv


class TinyNet(nn.Module):
    """stem conv -> [3x3 s2, depthwise 3x3, 1x1 expand, 1x1 project] -> pool -> linear."""

    def __init__(self, conv: ConvFactory, *, in_channels: int = 3, num_classes: int = 10,
                 width: int = 16, input_size: int = 32, dropout: float = 0.0,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
                 ) -> None:
        super().__init__()
        self.num_classes, self.in_channels, self.input_size = num_classes, in_channels, input_size
        self.mean, self.std = mean, std  # preprocessing of [0, 1] pixels the model expects
        self.stem = nn.Sequential(static_conv(in_channels, width, 3, 1, 1),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.conv1 = conv(width, 2 * width, 3, 2, 1)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.conv2 = conv(2 * width, 2 * width, 3, 1, 1, 2 * width)  # depthwise
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = conv(2 * width, 4 * width, 1)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.conv4 = conv(4 * width, 2 * width, 1)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * width, num_classes)

    @property
    def io_spec(self) -> IOSpec:
        """``image [B, C, S, S]`` -> ``logits [B, num_classes]``."""
        return image_classifier_spec(self.num_classes, channels=self.in_channels,
                                     size=self.input_size, mean=self.mean, std=self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.stem(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)) + x)
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.bn4(self.conv4(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.dropout(x))


def build_tinynet(*, od: bool, in_channels: int = 3, num_classes: int = 10, width: int = 16,
                  input_size: int = 32, reduction: float = DEFAULT_REDUCTION,
                  kernel_num: int = 1, dropout: float = 0.0,
                  mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
                  ) -> TinyNet:
    """TinyNet; with ``od=True`` its four block convs are ODConv."""
    conv = odconv_factory(reduction, kernel_num) if od else static_conv
    return TinyNet(conv, in_channels=in_channels, num_classes=num_classes, width=width,
                   input_size=input_size, dropout=dropout, mean=mean, std=std)
