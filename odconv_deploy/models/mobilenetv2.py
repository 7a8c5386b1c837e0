"""MobileNetV2 and OD-MobileNetV2, built the same way (reference architecture and names).

ODConv replaces every conv of the inverted residual blocks and the last 1x1 conv; the stem
and the classifier stay static, as in OSVAI/ODConv.
"""

from __future__ import annotations

import torch
from torch import nn

from odconv_deploy.io_spec import IMAGENET_MEAN, IMAGENET_STD, IOSpec, image_classifier_spec
from odconv_deploy.layers.odconv import DEFAULT_REDUCTION
from odconv_deploy.models.resnet import ConvFactory, odconv_factory, static_conv

#: t (expansion), c (channels), n (repeats), s (stride) of MobileNetV2.
INVERTED_RESIDUAL_SETTING = [
    [1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
    [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1],
]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never below 90% of it (TF MobileNet rule)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class ConvBNReLU(nn.Sequential):
    """conv, BatchNorm, ReLU6 (indices 0, 1, 2 as in the reference)."""

    def __init__(self, conv: ConvFactory, in_planes: int, out_planes: int, kernel_size: int = 3,
                 stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            conv(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2, groups),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1, depthwise 3x3, project 1x1 (linear), residual when shapes allow."""

    def __init__(self, conv: ConvFactory, inp: int, oup: int, stride: int,
                 expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(conv, inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(conv, hidden, hidden, stride=stride, groups=hidden),
            conv(hidden, oup, 1, 1, 0),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 whose block convs (and last 1x1) come from ``conv``."""

    def __init__(self, conv: ConvFactory, width_mult: float = 1.0, num_classes: int = 1000,
                 dropout: float = 0.2, *, in_channels: int = 3, input_size: int = 224,
                 mean: tuple[float, ...] | None = IMAGENET_MEAN,
                 std: tuple[float, ...] | None = IMAGENET_STD) -> None:
        super().__init__()
        self.num_classes, self.in_channels, self.input_size = num_classes, in_channels, input_size
        self.mean, self.std = mean, std  # preprocessing of [0, 1] pixels the model expects
        input_channel = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU(static_conv, in_channels, input_channel,
                                                stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            output_channel = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(conv, input_channel, output_channel,
                                                 s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU(conv, input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout),
                                        nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def io_spec(self) -> IOSpec:
        """``image [B, C, size, size]`` (default 3, 224) -> ``logits [B, num_classes]``."""
        return image_classifier_spec(self.num_classes, channels=self.in_channels,
                                     size=self.input_size, mean=self.mean, std=self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], -1)
        return self.classifier(x)


def build_mobilenetv2(width_mult: float, *, od: bool, num_classes: int = 1000,
                      dropout: float = 0.2, reduction: float = DEFAULT_REDUCTION,
                      kernel_num: int = 1, **io: object) -> MobileNetV2:
    """MobileNetV2 at ``width_mult``; with ``od=True`` its block convs are ODConv.

    ``io``: ``in_channels``, ``input_size``, ``mean``, ``std`` of :class:`MobileNetV2`.
    """
    conv = odconv_factory(reduction, kernel_num) if od else static_conv
    return MobileNetV2(conv, width_mult, num_classes=num_classes, dropout=dropout, **io)
