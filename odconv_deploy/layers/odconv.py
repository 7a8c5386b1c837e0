"""Train-time ODConv: checkpoint-compatible with the reference implementation (OSVAI/ODConv).

Parameter names, shapes, constructor arguments, head-dropping rules and forward numerics match
the reference layer, so its state_dicts load here with ``strict=True``. The train-time forward
folds the batch into conv groups exactly as the reference does (fast for training on GPUs); use
:func:`odconv_deploy.reparameterize_model` to get the export-friendly inference form.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from odconv_deploy.errors import InputShapeError, UnsupportedLayerError

#: Defaults of the reference implementation.
DEFAULT_REDUCTION = 0.0625
DEFAULT_MIN_CHANNEL = 16


def attention_channels(in_planes: int, reduction: float, min_channel: int) -> int:
    """Width ``A`` of the attention trunk: ``max(int(C_in * reduction), min_channel)``."""
    return max(int(in_planes * reduction), min_channel)


def as_square(value: int | tuple[int, ...] | list[int], what: str, layer: str) -> int:
    """Return ``value`` as one int, accepting an int or a tuple of two equal ints.

    ODConv's attention and weights assume square geometry, as the reference does.
    """
    if isinstance(value, bool):
        raise UnsupportedLayerError(f"{layer}: {what} must be an int, got {value!r}.")
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        if value[0] != value[1]:
            raise UnsupportedLayerError(
                f"{layer}: {what}={tuple(value)} is not square. "
                f"Note: ODConv supports square {what}s only (one int, or (n, n))."
            )
        return value[0]
    raise UnsupportedLayerError(
        f"{layer}: {what} must be an int or a pair of equal ints, got {value!r}."
    )


class Attentions(NamedTuple):
    """The four ODConv attentions of a batch; ``None`` where the head is dropped (== 1).

    Shapes: channel ``[B, C_in, 1, 1]``, filter ``[B, C_out, 1, 1]``, spatial ``[B, k*k]``,
    kernel ``[B, K]``.
    """

    channel: torch.Tensor
    filter: torch.Tensor | None
    spatial: torch.Tensor | None
    kernel: torch.Tensor | None


class ODAttention(nn.Module):
    """Train-time attention trunk and heads of ODConv (reference names: ``fc``, ``bn``, ``*_fc``).

    ``temperature`` is a plain attribute, not state: training anneals it, export uses 1.
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int,
        groups: int = 1,
        reduction: float = DEFAULT_REDUCTION,
        kernel_num: int = 4,
        min_channel: int = DEFAULT_MIN_CHANNEL,
    ) -> None:
        super().__init__()
        channels = attention_channels(in_planes, reduction, min_channel)
        self.kernel_size = kernel_size
        self.kernel_num = kernel_num
        self.temperature = 1.0

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(in_planes, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(channels, in_planes, 1, bias=True)
        # Heads the reference drops because they would be trivial (attention == 1).
        depthwise = is_depthwise(in_planes, out_planes, groups)
        self.filter_fc = None if depthwise else nn.Conv2d(channels, out_planes, 1, bias=True)
        self.spatial_fc = (
            None if kernel_size == 1 else nn.Conv2d(channels, kernel_size * kernel_size, 1)
        )
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(channels, kernel_num, 1)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def update_temperature(self, temperature: float) -> None:
        """Set the softmax/sigmoid temperature (the reference anneals it from 30 to 1)."""
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> Attentions:
        """Train-time forward: attentions of ``x`` ``[B, C_in, H, W]``."""
        batch = x.shape[0]
        t = self.temperature
        h = self.relu(self.bn(self.fc(self.avgpool(x))))
        channel = torch.sigmoid(self.channel_fc(h).view(batch, -1, 1, 1) / t)
        filt = None
        if self.filter_fc is not None:
            filt = torch.sigmoid(self.filter_fc(h).view(batch, -1, 1, 1) / t)
        spatial = None
        if self.spatial_fc is not None:
            spatial = torch.sigmoid(self.spatial_fc(h).view(batch, -1) / t)
        kernel = None
        if self.kernel_fc is not None:
            kernel = torch.softmax(self.kernel_fc(h).view(batch, -1) / t, dim=1)
        return Attentions(channel, filt, spatial, kernel)


class ODConv2d(nn.Module):
    """Omni-dimensional dynamic convolution, train-time form.

    ``W(x) = sum_i a_w[i] * a_s * a_c * a_f * W_i``, with ``a_c`` applied to the input and
    ``a_f`` to the output as in the reference. No bias, square kernels, zero padding.

    Args:
        in_planes: Input channels ``C_in``.
        out_planes: Output channels ``C_out``.
        kernel_size: Square kernel size ``k``.
        stride: Conv stride.
        padding: Zero padding on each side.
        dilation: Conv dilation.
        groups: Conv groups; ``groups == C_in == C_out`` is depthwise (no filter attention).
        reduction: Attention width ratio; width is ``max(int(C_in * reduction), min_channel)``.
        kernel_num: Number of kernels ``K`` mixed by the kernel attention.
        min_channel: Minimum attention width (16 in the reference).
        padding_mode: Only ``"zeros"`` is supported (the reference pads with zeros).
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        reduction: float = DEFAULT_REDUCTION,
        kernel_num: int = 4,
        *,
        min_channel: int = DEFAULT_MIN_CHANNEL,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        name = f"ODConv2d({in_planes}, {out_planes}, kernel_size={kernel_size!r})"
        kernel_size = as_square(kernel_size, "kernel_size", name)
        stride = as_square(stride, "stride", name)
        dilation = as_square(dilation, "dilation", name)
        if isinstance(padding, str):
            raise UnsupportedLayerError(
                f"{name}: padding={padding!r} is not supported. "
                "Note: give the zero padding per side as an int (e.g. kernel_size // 2)."
            )
        padding = as_square(padding, "padding", name)
        if padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{name}: padding_mode={padding_mode!r} is not supported. "
                "Note: ODConv pads with zeros only (padding_mode='zeros')."
            )
        for what, value, low in (
            ("in_planes", in_planes, 1), ("out_planes", out_planes, 1),
            ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
            ("dilation", dilation, 1), ("groups", groups, 1), ("kernel_num", kernel_num, 1),
        ):
            if value < low:
                raise UnsupportedLayerError(f"{name}: {what}={value} must be >= {low}.")
        if in_planes % groups or out_planes % groups:
            raise UnsupportedLayerError(
                f"{name}: groups={groups} must divide in_planes={in_planes} and "
                f"out_planes={out_planes}."
            )
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.kernel_num = kernel_num
        #: Qualified name inside its model, set by the zoo and the converter; used in errors.
        self.layer_name: str | None = None
        self.attention = ODAttention(
            in_planes, out_planes, kernel_size, groups=groups, reduction=reduction,
            kernel_num=kernel_num, min_channel=min_channel,
        )
        self.weight = nn.Parameter(
            torch.empty(kernel_num, out_planes, in_planes // groups, kernel_size, kernel_size)
        )
        for i in range(kernel_num):
            nn.init.kaiming_normal_(self.weight[i], mode="fan_out", nonlinearity="relu")

    def extra_repr(self) -> str:
        """Constructor arguments, as shown by ``print(model)``."""
        return (
            f"{self.in_planes}, {self.out_planes}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, kernel_num={self.kernel_num}"
        )

    def update_temperature(self, temperature: float) -> None:
        """Set the attention temperature (exported models use 1)."""
        self.attention.update_temperature(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Train-time forward (batch folded into conv groups, as in the reference)."""
        check_conv_input(x, self.in_planes, self.layer_name or repr_head(self), self.weight.dtype)
        att = self.attention(x)
        batch, _, height, width = x.shape
        x = x * att.channel
        if self.kernel_size == 1 and self.kernel_num == 1:
            out = F.conv2d(x, self.weight[0], None, self.stride, self.padding,
                           self.dilation, self.groups)
        else:
            weight = self.weight.unsqueeze(0)  # [1, K, C_out, C_in/g, k, k]
            if att.spatial is not None:
                weight = weight * att.spatial.view(batch, 1, 1, 1, self.kernel_size,
                                                   self.kernel_size)
            if att.kernel is not None:
                weight = weight * att.kernel.view(batch, -1, 1, 1, 1, 1)
            weight = weight.sum(dim=1).reshape(
                -1, self.in_planes // self.groups, self.kernel_size, self.kernel_size
            )
            out = F.conv2d(x.reshape(1, -1, height, width), weight, None, self.stride,
                           self.padding, self.dilation, self.groups * batch)
            out = out.view(batch, self.out_planes, out.shape[-2], out.shape[-1])
        if att.filter is not None:
            out = out * att.filter
        return out


def repr_head(module: nn.Module) -> str:
    """Short description of a layer for error messages: class name and constructor arguments."""
    return f"{type(module).__name__}({module.extra_repr()})"


def is_depthwise(in_channels: int, out_channels: int, groups: int) -> bool:
    """Whether a conv is depthwise (``groups == C_in == C_out``): one filter per channel."""
    return in_channels == groups == out_channels


def check_conv_input(x: torch.Tensor, in_channels: int, layer: str,
                     dtype: torch.dtype | None = None) -> None:
    """Raise :class:`InputShapeError` unless ``x`` fits the layer.

    ``x`` must be ``[B, in_channels, H, W]`` of ``dtype`` (any floating dtype when None).
    """
    if torch.jit.is_tracing():  # shapes are fixed by the exporter; avoid tracer warnings
        return
    if not isinstance(x, torch.Tensor):
        raise InputShapeError(f"{layer}: expected a torch.Tensor, received {type(x).__name__}.")
    if x.dim() != 4:
        raise InputShapeError(
            f"{layer}: received a tensor of shape {tuple(x.shape)} (rank {x.dim()}); "
            f"expected rank 4 [batch, {in_channels}, height, width]."
        )
    if x.shape[1] != in_channels:
        raise InputShapeError(
            f"{layer}: received {x.shape[1]} input channels (shape {tuple(x.shape)}); "
            f"expected {in_channels}."
        )
    if not x.is_floating_point() or (dtype is not None and x.dtype != dtype):
        raise InputShapeError(
            f"{layer}: received dtype {x.dtype}; expected "
            f"{dtype if dtype is not None else 'a floating-point tensor'}."
        )
