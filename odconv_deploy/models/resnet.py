"""ResNet and OD-ResNet, built the same way (reference architecture and parameter names).

ODConv replaces every conv inside the residual blocks; the stem, the downsample convs and the
classifier stay static, as in OSVAI/ODConv.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from odconv_deploy.io_spec import IOSpec, image_classifier_spec
from odconv_deploy.layers.odconv import DEFAULT_REDUCTION, ODConv2d

ConvFactory = Callable[..., nn.Module]


def static_conv(in_planes: int, out_planes: int, kernel_size: int, stride: int = 1,
                padding: int = 0, groups: int = 1) -> nn.Module:
    """A bias-free static conv (the baseline block conv)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups,
                     bias=False)


def odconv_factory(reduction: float, kernel_num: int) -> ConvFactory:
    """A conv factory that builds ODConv layers with the given attention settings."""

    def make(in_planes: int, out_planes: int, kernel_size: int, stride: int = 1,
             padding: int = 0, groups: int = 1) -> nn.Module:
        return ODConv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups,
                        reduction=reduction, kernel_num=kernel_num)

    return make


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, conv: ConvFactory, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv(inplanes, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), with a residual connection."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, conv: ConvFactory, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv(inplanes, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv(planes, planes * self.expansion, 1)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet whose block convs come from ``conv`` (static or ODConv)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int],
                 conv: ConvFactory, num_classes: int = 1000, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], conv)
        self.layer2 = self._make_layer(block, 128, layers[1], conv, stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], conv, stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], conv, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    conv: ConvFactory, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, conv, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, conv) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def io_spec(self) -> IOSpec:
        """``image [B, 3, 224, 224]`` -> ``logits [B, num_classes]``."""
        return image_classifier_spec(self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


_DEPTHS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
           50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3])}


def build_resnet(depth: int, *, od: bool, num_classes: int = 1000, dropout: float | None = None,
                 reduction: float = DEFAULT_REDUCTION, kernel_num: int = 1) -> ResNet:
    """ResNet-``depth``; with ``od=True`` the block convs are ODConv.

    Reference defaults: dropout 0.1 for OD models, none for the static twins.
    """
    block, layers = _DEPTHS[depth]
    conv = odconv_factory(reduction, kernel_num) if od else static_conv
    if dropout is None:
        dropout = 0.1 if od else 0.0
    return ResNet(block, layers, conv, num_classes=num_classes, dropout=dropout)
