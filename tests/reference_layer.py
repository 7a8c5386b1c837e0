"""A stand-in for the reference ODConv2d as users paste it into their projects.

Written for these tests from the brief's description of the reference layer: the same
parameter names and head-dropping rules, a different Python class, and the reference's
deployment-hostile forward (batch folded into conv groups, rank-6 attention views). It is
the oracle for checkpoint compatibility and for conversion of "foreign" ODConv classes.
"""

import torch
import torch.nn.functional as F
from torch import nn


class PastedAttention(nn.Module):
    def __init__(self, cin, cout, k, groups=1, reduction=0.0625, kernel_num=4, min_channel=16):
        super().__init__()
        a = max(int(cin * reduction), min_channel)
        self.kernel_size, self.kernel_num, self.temperature = k, kernel_num, 1.0
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(cin, a, 1, bias=False)
        self.bn = nn.BatchNorm2d(a)
        self.relu = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(a, cin, 1, bias=True)
        self.use_filter = not (cin == groups and cin == cout)
        if self.use_filter:
            self.filter_fc = nn.Conv2d(a, cout, 1, bias=True)
        if k > 1:
            self.spatial_fc = nn.Conv2d(a, k * k, 1, bias=True)
        if kernel_num > 1:
            self.kernel_fc = nn.Conv2d(a, kernel_num, 1, bias=True)

    def update_temperature(self, t):
        self.temperature = t

    def forward(self, x):
        h = self.relu(self.bn(self.fc(self.avgpool(x))))
        b, t, k = x.size(0), self.temperature, self.kernel_size
        channel = torch.sigmoid(self.channel_fc(h).view(b, -1, 1, 1) / t)
        filt = torch.sigmoid(self.filter_fc(h).view(b, -1, 1, 1) / t) if self.use_filter else 1.0
        spatial = (torch.sigmoid(self.spatial_fc(h).view(b, 1, 1, 1, k, k) / t)
                   if k > 1 else 1.0)
        kernel = (F.softmax(self.kernel_fc(h).view(b, -1, 1, 1, 1, 1) / t, dim=1)
                  if self.kernel_num > 1 else 1.0)
        return channel, filt, spatial, kernel


class PastedODConv2d(nn.Module):
    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, reduction=0.0625, kernel_num=4):
        super().__init__()
        self.in_planes, self.out_planes, self.kernel_size = in_planes, out_planes, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.kernel_num = kernel_num
        self.attention = PastedAttention(in_planes, out_planes, kernel_size, groups, reduction,
                                         kernel_num)
        self.weight = nn.Parameter(
            torch.randn(kernel_num, out_planes, in_planes // groups, kernel_size, kernel_size))

    def update_temperature(self, t):
        self.attention.update_temperature(t)

    def forward(self, x):
        channel, filt, spatial, kernel = self.attention(x)
        b, c, h, w = x.size()
        x = x * channel
        if self.kernel_size == 1 and self.kernel_num == 1:
            out = F.conv2d(x, self.weight.squeeze(0), None, self.stride, self.padding,
                           self.dilation, self.groups)
            return out * filt
        x = x.reshape(1, -1, h, w)
        agg = torch.sum(spatial * kernel * self.weight.unsqueeze(0), dim=1)
        agg = agg.view(-1, self.in_planes // self.groups, self.kernel_size, self.kernel_size)
        out = F.conv2d(x, agg, None, self.stride, self.padding, self.dilation,
                       self.groups * b)
        out = out.view(b, self.out_planes, out.size(-2), out.size(-1))
        return out * filt
