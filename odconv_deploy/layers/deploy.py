"""Inference-time ODConv: the same function as the train form, in export-friendly ops.

Three strategies (brief section 3), each an exact rewrite and each its own class, plus one
form for depthwise layers only (``depthwise_taps``, chosen per layer by ``strategy="auto"``):

- ``im2col``: pad/slice im2col and a batched matmul with the per-sample aggregated weight.
  Any batch, no tensor above rank 4, no dynamic conv weight.
- ``dynamic_weight``: one conv per sample whose weight is computed at run time. The export
  unrolls the batch loop, so exported graphs have a fixed batch (use batch 1).
- ``static_weight``: every dynamic factor moved onto activations, so convs keep constant
  weights (what XNNPACK, TFLite and ncnn need). ``K > 1`` costs ``K`` times the conv MACs.

All share the folded attention: BatchNorm folded into ``fc``, ``1/T`` folded into the heads,
all heads evaluated by one matrix product. A BatchNorm that followed the layer can be folded
into the kernels and a bias. The classes can be built directly, so a converted checkpoint
loads with plain ``load_state_dict``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from odconv_deploy.errors import UnsupportedLayerError
from odconv_deploy.fusion import fold_bn_into_linear, fold_output_bn, stack_attention_heads
from odconv_deploy.layers.im2col import im2col, onehot_tap_kernel
from odconv_deploy.layers.odconv import Attentions, check_conv_input, is_depthwise

if TYPE_CHECKING:  # detect imports layers.odconv; avoid the cycle at run time
    from odconv_deploy.detect import ODConvSpec


class ODConv2dDeploy(nn.Module):
    """Base of the deploy forms: folded attention, parameters, construction from a train layer.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Square kernel size.
        stride: Conv stride.
        padding: Zero padding per side.
        dilation: Conv dilation.
        groups: Conv groups.
        kernel_num: Number of kernels ``K``.
        attention_channels: Width of the attention trunk.
        filter_attention: Whether the filter head exists (default: the reference rule,
            absent for depthwise convs).
        spatial_attention: Whether the spatial head exists (default: ``kernel_size > 1``).
        kernel_attention: Whether the kernel head exists (default: ``kernel_num > 1``).
        bias: Whether the layer has an output bias (it does once a BatchNorm is folded in).
    """

    strategy: ClassVar[str] = ""
    #: False where the exported graph has the batch size baked in.
    supports_dynamic_batch: ClassVar[bool] = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        kernel_num: int = 4,
        attention_channels: int,
        filter_attention: bool | None = None,
        spatial_attention: bool | None = None,
        kernel_attention: bool | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        depthwise = is_depthwise(in_channels, out_channels, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.kernel_num = kernel_num
        self.depthwise = depthwise
        self.has_filter = (not depthwise) if filter_attention is None else filter_attention
        self.has_spatial = (kernel_size > 1) if spatial_attention is None else spatial_attention
        self.has_kernel = (kernel_num > 1) if kernel_attention is None else kernel_attention
        #: Temperature folded into the heads at conversion (provenance only).
        self.temperature = 1.0
        self.layer_name: str | None = None

        sizes = [in_channels, out_channels if self.has_filter else 0,
                 kernel_size * kernel_size if self.has_spatial else 0,
                 kernel_num if self.has_kernel else 0]
        bounds = [sum(sizes[:i]) for i in range(5)]
        self._head_slices = [(bounds[i], bounds[i + 1]) if sizes[i] else None for i in range(4)]
        self.attention_fc = nn.Linear(in_channels, attention_channels)
        self.attention_heads = nn.Linear(attention_channels, bounds[4])
        self.weight = nn.Parameter(torch.zeros(self.weight_shape()))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # Derived constant (not saved): the one-hot kernel that builds im2col columns.
        self.register_buffer("tap_kernel", onehot_tap_kernel(in_channels, kernel_size),
                             persistent=False)

    @property
    def taps(self) -> int:
        """Kernel taps ``k*k``."""
        return self.kernel_size * self.kernel_size

    def weight_shape(self) -> tuple[int, ...]:
        """Shape of ``self.weight`` in this strategy's layout (canonical: the train layout)."""
        return (self.kernel_num, self.out_channels, self.in_channels // self.groups,
                self.kernel_size, self.kernel_size)

    def layout_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Rearrange a canonical ``[K, C_out, C_in/g, k, k]`` weight into this layout."""
        return weight

    def extra_repr(self) -> str:
        """Constructor arguments and strategy, as shown by ``print(model)``."""
        heads = [n for n, on in (("filter", self.has_filter), ("spatial", self.has_spatial),
                                 ("kernel", self.has_kernel)) if on]
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, kernel_num={self.kernel_num}, "
            f"heads=channel+{'+'.join(heads) or 'none'}, bias={self.bias is not None}, "
            f"strategy={self.strategy!r}"
        )

    @classmethod
    def from_spec(cls, spec: ODConvSpec, output_bn: nn.BatchNorm2d | None = None
                  ) -> ODConv2dDeploy:
        """Build the deploy form of a train layer (read by :func:`inspect_odconv`).

        Args:
            spec: The train layer's configuration and tensors.
            output_bn: A BatchNorm2d that directly follows the layer, to fold in.
        """
        weight = spec.weight
        if "kernel_fc" not in spec.heads and spec.kernel_num > 1:
            # No kernel head means a_w == 1: the kernels simply add up.
            weight = weight.sum(dim=0, keepdim=True)
        layer = cls(
            spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride,
            padding=spec.padding, dilation=spec.dilation, groups=spec.groups,
            kernel_num=weight.shape[0], attention_channels=spec.attention_channels,
            filter_attention="filter_fc" in spec.heads,
            spatial_attention="spatial_fc" in spec.heads,
            kernel_attention="kernel_fc" in spec.heads,
            bias=output_bn is not None,
        ).to(weight.dtype)
        layer.temperature = spec.temperature
        layer.layer_name = spec.name or None
        with torch.no_grad():
            fc_w, fc_b = fold_bn_into_linear(spec.fc_weight, spec.bn)
            heads = [spec.heads[n] for n in ("channel_fc", "filter_fc", "spatial_fc",
                                             "kernel_fc") if n in spec.heads]
            head_w, head_b = stack_attention_heads(heads, spec.temperature)
            if output_bn is not None:
                weight, bias = fold_output_bn(weight, output_bn)
                layer.bias.copy_(bias)
            layer.attention_fc.weight.copy_(fc_w)
            layer.attention_fc.bias.copy_(fc_b)
            layer.attention_heads.weight.copy_(head_w)
            layer.attention_heads.bias.copy_(head_b)
            layer.weight.copy_(layer.layout_weight(weight))
        return layer

    def attentions(self, x: torch.Tensor) -> Attentions:
        """Inference-mode attentions of ``x``.

        Shapes: channel ``[B, C_in]``, filter ``[B, C_out]``, spatial ``[B, k*k]``, kernel
        ``[B, K]``; ``None`` where the head is absent.
        """
        hidden = torch.relu(self.attention_fc(x.mean(dim=(2, 3))))
        logits = self.attention_heads(hidden)
        channel, filt, spatial, kernel = (
            None if s is None else logits[:, s[0]:s[1]] for s in self._head_slices
        )
        return Attentions(
            torch.sigmoid(channel),
            None if filt is None else torch.sigmoid(filt),
            None if spatial is None else torch.sigmoid(spatial),
            None if kernel is None else torch.softmax(kernel, dim=1),
        )

    def _check(self, x: torch.Tensor) -> None:
        check_conv_input(x, self.in_channels, self.layer_name or type(self).__name__,
                         self.weight.dtype)

    def _finish(self, out: torch.Tensor, filt: torch.Tensor | None) -> torch.Tensor:
        """Apply the filter attention ``[B, C_out]`` (if any) and the bias to the output."""
        if filt is not None:
            out = out * filt[:, :, None, None]
        if self.bias is not None:
            out = out + self.bias[:, None, None]
        return out


class Im2colODConv2d(ODConv2dDeploy):
    """Deploy form: one-hot-conv im2col, then a per-sample, per-group batched matmul.

    The kernel bank is stored in ``linear`` layout, ``[C_out*C_in/g*k*k, K]``, so the kernel
    aggregation is one fully-connected op (delegated by XNNPACK; one pass over the weights in
    ONNX Runtime). Channel and filter attention go to whichever side is smaller: the
    activations or the per-sample weight.
    """

    strategy = "im2col"

    def weight_shape(self) -> tuple[int, ...]:  # noqa: D102 - see base class
        return (self.out_channels * self.in_channels // self.groups * self.taps,
                self.kernel_num)

    def layout_weight(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return weight.reshape(self.kernel_num, -1).t()

    def aggregated_weight(self, att: Attentions) -> torch.Tensor:
        """Kernel aggregation, one fully-connected op over the bank: ``[B or 1, N]``."""
        return F.linear(att.kernel, self.weight) if att.kernel is not None else self.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference-mode forward."""
        self._check(x)
        att = self.attentions(x)
        g, cin_g, cout_g, taps = (self.groups, self.in_channels // self.groups,
                                  self.out_channels // self.groups, self.taps)
        weight = self.aggregated_weight(att).reshape(-1, g, cout_g, cin_g * taps)
        pixels = x.shape[2] * x.shape[3]
        out_pixels = pixels // (self.stride * self.stride)
        # Channel attention on the input map (C_in*H*W) or on the weight (C_out*C_in/g*k*k),
        # whichever is smaller. Weight-side factors are combined into one small
        # [B, g, 1, C_in/g*k*k] scale first, so the big multiply broadcasts over whole rows.
        channel_on_weight = self.in_channels * pixels > self.out_channels * cin_g * taps
        if not channel_on_weight:
            x = x * att.channel[:, :, None, None]
        scale = None
        if channel_on_weight:
            scale = att.channel.reshape(-1, g, cin_g, 1)
            if att.spatial is not None:
                scale = scale * att.spatial[:, None, None, :]
        elif att.spatial is not None:
            scale = att.spatial[:, None, None, :].expand(-1, 1, cin_g, -1)
        if scale is not None:
            weight = weight * scale.reshape(scale.shape[0], -1, 1, cin_g * taps)
        filt = att.filter
        if filt is not None and out_pixels > cin_g * taps:
            weight = weight * filt.reshape(-1, g, cout_g, 1)
            filt = None
        cols = im2col(x, self.tap_kernel, self.kernel_size, self.stride, self.padding,
                      self.dilation)
        batch, out_h, out_w = cols.shape[0], cols.shape[2], cols.shape[3]
        if self.depthwise:
            # Depthwise: multiply-accumulate over the k*k taps of each channel.
            cols = cols.reshape(batch, self.out_channels, taps, -1)
            weight = weight.reshape(-1, self.out_channels, taps, 1)
            out = (cols * weight).sum(dim=2).reshape(batch, self.out_channels, out_h, out_w)
        else:
            cols = cols.reshape(batch, g, cin_g * taps, -1)
            out = (weight @ cols).reshape(batch, self.out_channels, out_h, out_w)
        return self._finish(out, filt)


class DepthwiseTapsODConv2d(Im2colODConv2d):
    """Deploy form for depthwise layers: a multiply-add over ``k*k`` shifted views of the input.

    Depthwise im2col writes ``k*k`` copies of the activation and runs a one-hot conv with
    ``k*k`` outputs per channel; here each tap is a strided slice of the padded input scaled by
    the per-sample ``[B, C]`` weight of that tap, and the taps are summed. Any batch, rank <= 4,
    same kernel-bank layout as ``im2col``. Only for depthwise layers.
    """

    strategy = "depthwise_taps"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs: object
                 ) -> None:
        groups = kwargs.get("groups", 1)
        if not is_depthwise(in_channels, out_channels, groups):
            raise UnsupportedLayerError(
                f"Strategy 'depthwise_taps' takes depthwise layers only (in_channels == groups "
                f"== out_channels); got in={in_channels}, out={out_channels}, groups={groups}. "
                "Note: use 'im2col', or strategy='auto', which applies it where it fits."
            )
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference-mode forward."""
        self._check(x)
        att = self.attentions(x)
        channels, taps, k, s, d = (self.out_channels, self.taps, self.kernel_size, self.stride,
                                   self.dilation)
        weight = self.aggregated_weight(att).reshape(-1, channels, taps) * att.channel[:, :, None]
        if att.spatial is not None:
            weight = weight * att.spatial[:, None, :]
        p = self.padding
        padded = F.pad(x, (p, p, p, p)) if p else x
        out_h = (x.shape[2] + 2 * p - d * (k - 1) - 1) // s + 1
        out_w = (x.shape[3] + 2 * p - d * (k - 1) - 1) // s + 1
        out = None
        for t in range(taps):
            i, j = divmod(t, k)
            view = padded[:, :, i * d:i * d + s * (out_h - 1) + 1:s,
                          j * d:j * d + s * (out_w - 1) + 1:s]
            term = view * weight[:, :, t, None, None]
            out = term if out is None else out + term
        return self._finish(out, att.filter)


class DynamicWeightODConv2d(ODConv2dDeploy):
    """Deploy form: per sample, one conv whose weight is aggregated at run time.

    Exact at any batch in PyTorch; an export unrolls the per-sample loop, so exported graphs
    have a fixed batch (batch 1 is the intended use: ONNX Conv and CoreML conv accept a
    computed weight).
    """

    strategy = "dynamic_weight"
    supports_dynamic_batch = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference-mode forward."""
        self._check(x)
        att = self.attentions(x)
        flat = self.weight.reshape(self.kernel_num, -1)
        k = self.kernel_size
        outs = []
        for b in range(x.shape[0]):
            weight = att.kernel[b] @ flat if att.kernel is not None else flat[0]
            weight = weight.reshape(self.out_channels, self.in_channels // self.groups, k, k)
            if att.spatial is not None:
                weight = weight * att.spatial[b].reshape(1, 1, k, k)
            xb = x[b:b + 1] * att.channel[b].reshape(1, -1, 1, 1)
            outs.append(F.conv2d(xb, weight, None, self.stride, self.padding, self.dilation,
                                 self.groups))
        out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
        return self._finish(out, att.filter)


class StaticWeightODConv2d(ODConv2dDeploy):
    """Deploy form with constant conv weights: attentions act on activations only.

    im2col columns (one-hot conv, channel-major) are scaled by channel x spatial attention
    and fed to one static grouped 1x1 conv that produces every kernel's output (``[K*C_out]``),
    which the kernel attention then mixes. 1x1 layers skip im2col and use a strided static
    conv. Weight layout: ``[groups*K*C_out/g, C_in/g*k*k, 1, 1]``.
    """

    strategy = "static_weight"

    def weight_shape(self) -> tuple[int, ...]:  # noqa: D102 - see base class
        return (self.kernel_num * self.out_channels, self.taps * self.in_channels // self.groups,
                1, 1)

    def layout_weight(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        k_num, g = self.kernel_num, self.groups
        weight = weight.reshape(k_num, g, self.out_channels // g, -1)
        return weight.transpose(0, 1).reshape(self.weight_shape())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference-mode forward."""
        self._check(x)
        att = self.attentions(x)
        batch = x.shape[0]
        if self.kernel_size == 1:
            scale = att.channel if att.spatial is None else att.channel * att.spatial
            out = F.conv2d(x * scale[:, :, None, None], self.weight, None, self.stride,
                           self.padding, 1, self.groups)
        else:
            cols = im2col(x, self.tap_kernel, self.kernel_size, self.stride, self.padding,
                          self.dilation)
            scale = att.channel[:, :, None]
            if att.spatial is not None:
                scale = scale * att.spatial[:, None, :]  # [B, C_in, k*k], channel-major
            cols = cols * scale.reshape(batch, -1, 1, 1)
            out = F.conv2d(cols, self.weight, None, 1, 0, 1, self.groups)
        if self.kernel_num > 1:
            out_h, out_w = out.shape[2], out.shape[3]
            out = out.reshape(batch, self.groups, self.kernel_num, -1)
            if att.kernel is not None:
                out = out * att.kernel[:, None, :, None]
            out = out.sum(dim=2).reshape(batch, self.out_channels, out_h, out_w)
        return self._finish(out, att.filter)


#: Deploy strategies by name: forms that take every ODConv layer.
DEPLOY_STRATEGIES: dict[str, type[ODConv2dDeploy]] = {
    cls.strategy: cls for cls in (Im2colODConv2d, DynamicWeightODConv2d, StaticWeightODConv2d)
}
#: Every deploy form, including those for one kind of layer (chosen per layer by ``auto``).
LAYER_FORMS: dict[str, type[ODConv2dDeploy]] = {
    **DEPLOY_STRATEGIES, DepthwiseTapsODConv2d.strategy: DepthwiseTapsODConv2d
}
DEFAULT_STRATEGY = "im2col"
