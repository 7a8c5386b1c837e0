"""A small YOLO-style detector with the pasted reference ODConv class: a user's network.

Stands in for the most common real use of ODConv (a YOLO fork with the authors' ODConv2d
class copied into it): a strided backbone, an FPN neck (nearest upsampling and ``torch.cat``
skips) and three detection heads at strides 8, 16 and 32, each giving the raw YOLO map
``[B, A*(5+nc), H, W]``. The ODConv layers are :class:`tests.reference_layer.PastedODConv2d`
(not this package's class), most inside a YOLO-like ``Conv`` block (conv, BatchNorm2d, SiLU).

ODConv layers (10), in order of ``named_modules``:

    backbone.s1.conv      16->32,  k3 s2 p1                    K=4  BN  strided
    backbone.s2b.conv     48->48,  k3 p1 groups=48             K=4  BN  depthwise
    backbone.s2c.conv     48->48,  k1                          K=1  BN  pointwise
    backbone.s3a.conv     48->64,  k3 s2 p1                    K=1  BN  strided
    backbone.s3b.m.conv   64->64,  k3 p2 dilation=2 groups=4   K=2  BN  grouped, in a residual
    backbone.s4b.conv     96->96,  k1                          K=2  BN  pointwise
    neck.n4.conv          128->64, k1 (after a cat)            K=1  BN  pointwise
    neck.n3.conv          96->48,  k3 p1 (after a cat)         K=1  BN  plain
    head.h3.conv          48->48,  k3 p1                       K=2  --  SiLU directly, no BN
    head.h5.conv          64->64,  k3 p1 groups=64             K=1  BN  depthwise

So a conversion folds 9 BatchNorms (``head.h3`` has none). Static convs (stem, strided
downsamples, laterals, one head block, the 1x1 prediction convs) stay ``nn.Conv2d``.
"""

from __future__ import annotations

import torch
from torch import nn

from odconv_deploy.synthetic import synthesize_weights
from tests.reference_layer import PastedODConv2d

#: The input the detector is built for (non-square; any multiple of 32 works).
INPUT_SHAPE = (1, 3, 256, 320)
#: Anchors per level.
NUM_ANCHORS = 3
#: Output names (strides 8, 16, 32) of the ``as_dict`` variant, in tuple order.
OUTPUT_NAMES = ("p3", "p4", "p5")
#: Number of ODConv layers, and of those followed by a BatchNorm2d (foldable).
NUM_ODCONV = 10
NUM_FOLDABLE_BN = 9


class Conv(nn.Module):
    """YOLO-style ``Conv``: conv (static or pasted ODConv), optional BatchNorm2d, SiLU."""

    def __init__(self, c1, c2, k=1, s=1, g=1, d=1, od=False, kernel_num=4, bn=True):
        super().__init__()
        p = d * (k // 2)
        if od:
            self.conv = PastedODConv2d(c1, c2, k, stride=s, padding=p, dilation=d, groups=g,
                                       kernel_num=kernel_num)
        else:
            self.conv = nn.Conv2d(c1, c2, k, s, p, dilation=d, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2) if bn else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    """``x + m(x)``, as in YOLO's Bottleneck with shortcut."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)


class Backbone(nn.Module):
    """Stem and four stages; returns the stride-8, 16 and 32 features."""

    def __init__(self):
        super().__init__()
        self.stem = Conv(3, 16, 3, 2)                                   # /2
        self.s1 = Conv(16, 32, 3, 2, od=True, kernel_num=4)             # /4
        self.s2a = Conv(32, 48, 3, 2)                                   # /8
        self.s2b = Conv(48, 48, 3, g=48, od=True, kernel_num=4)
        self.s2c = Conv(48, 48, 1, od=True, kernel_num=1)
        self.s3a = Conv(48, 64, 3, 2, od=True, kernel_num=1)            # /16
        self.s3b = Residual(Conv(64, 64, 3, g=4, d=2, od=True, kernel_num=2))
        self.s4a = Conv(64, 96, 3, 2)                                   # /32
        self.s4b = Conv(96, 96, 1, od=True, kernel_num=2)

    def forward(self, x):
        x = self.s1(self.stem(x))
        c3 = self.s2c(self.s2b(self.s2a(x)))
        c4 = self.s3b(self.s3a(c3))
        c5 = self.s4b(self.s4a(c4))
        return c3, c4, c5


class Neck(nn.Module):
    """Top-down FPN: 1x1 laterals, nearest x2 upsampling, concatenation with the skips."""

    def __init__(self):
        super().__init__()
        self.lat5 = Conv(96, 64, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n4 = Conv(64 + 64, 64, 1, od=True, kernel_num=1)
        self.lat4 = Conv(64, 48, 1)
        self.n3 = Conv(48 + 48, 48, 3, od=True, kernel_num=1)

    def forward(self, c3, c4, c5):
        p5 = self.lat5(c5)
        p4 = self.n4(torch.cat([self.up(p5), c4], dim=1))
        p3 = self.n3(torch.cat([self.up(self.lat4(p4)), c3], dim=1))
        return p3, p4, p5


class Heads(nn.Module):
    """One block and one 1x1 prediction conv (with bias) per level."""

    def __init__(self, num_outputs):
        super().__init__()
        self.h3 = Conv(48, 48, 3, od=True, kernel_num=2, bn=False)
        self.h4 = Conv(64, 64, 3)
        self.h5 = Conv(64, 64, 3, g=64, od=True, kernel_num=1)
        self.pred3 = nn.Conv2d(48, num_outputs, 1)
        self.pred4 = nn.Conv2d(64, num_outputs, 1)
        self.pred5 = nn.Conv2d(64, num_outputs, 1)

    def forward(self, p3, p4, p5):
        return self.pred3(self.h3(p3)), self.pred4(self.h4(p4)), self.pred5(self.h5(p5))


class TinyDetector(nn.Module):
    """Backbone, FPN neck and three heads; a tuple (or dict) of maps at strides 8/16/32."""

    def __init__(self, num_classes=3, as_dict=False):
        super().__init__()
        self.num_classes = num_classes
        self.as_dict = as_dict
        self.backbone = Backbone()
        self.neck = Neck()
        self.head = Heads(NUM_ANCHORS * (5 + num_classes))

    def forward(self, x):
        p3, p4, p5 = self.head(*self.neck(*self.backbone(x)))
        if self.as_dict:
            return {"p3": p3, "p4": p4, "p5": p5}
        return p3, p4, p5


def build_detector(num_classes: int = 3, as_dict: bool = False, seed: int = 0) -> nn.Module:
    """The detector with deterministic, non-trivial weights (seeded), in eval mode.

    Every parameter is drawn from ``seed``; BatchNorm running statistics and affine
    parameters are randomised (so a wrong BN fold shows) and the ODConv attention heads are
    perturbed (peaky softmaxes, sigmoids far from 0.5).
    """
    # synthesize_weights overwrites every parameter (PastedODConv2d's global-RNG init too).
    return synthesize_weights(TinyDetector(num_classes, as_dict), seed=seed)


def output_shapes(batch: int = 1, height: int = INPUT_SHAPE[2], width: int = INPUT_SHAPE[3],
                  num_classes: int = 3) -> tuple[tuple[int, int, int, int], ...]:
    """Expected output shapes (strides 8, 16, 32) for an input of ``batch x 3 x H x W``."""
    channels = NUM_ANCHORS * (5 + num_classes)
    return tuple((batch, channels, height // s, width // s) for s in (8, 16, 32))
