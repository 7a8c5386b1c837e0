"""Inference-time ODConv: the same function as the train form, in export-friendly ops.

Three strategies (brief section 3), each an exact rewrite and each its own class, plus one
form for depthwise layers only (``depthwise_taps``, chosen per layer by ``strategy="auto"``;
so is ``ort_nchwc``, for ONNX Runtime CPU, in :mod:`odconv_deploy.layers.ort_nchwc`):

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

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from odconv_deploy.errors import UnsupportedLayerError
from odconv_deploy.fusion import fold_bn_into_linear, fold_output_bn, stack_attention_heads
from odconv_deploy.layers.im2col import im2col, onehot_tap_kernel
from odconv_deploy.layers.odconv import Attentions, check_conv_input, is_depthwise
from odconv_deploy.layers.spec import ODConvSpec


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

    form: ClassVar[str] = ""
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
        #: The bank stored int8 (``int8w``, :meth:`store_bank_int8`); ``weight`` is then None.
        self.weight_int8: nn.Module | None = None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # Derived constant (not saved): the one-hot kernel that builds im2col columns.
        self.register_buffer("tap_kernel", onehot_tap_kernel(in_channels, kernel_size),
                             persistent=False)

    @property
    def taps(self) -> int:
        """Kernel taps ``k*k``."""
        return self.kernel_size * self.kernel_size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output height and width of the conv for an input of ``height`` x ``width``."""
        reach = self.dilation * (self.kernel_size - 1) + 1
        return ((height + 2 * self.padding - reach) // self.stride + 1,
                (width + 2 * self.padding - reach) // self.stride + 1)

    def weight_shape(self) -> tuple[int, ...]:
        """Shape of ``self.weight`` in this form's layout (canonical: the train layout)."""
        return (self.kernel_num, self.out_channels, self.in_channels // self.groups,
                self.kernel_size, self.kernel_size)

    def layout_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Rearrange a canonical ``[K, C_out, C_in/g, k, k]`` weight into this layout."""
        return weight

    def canonical_weight(self) -> torch.Tensor:
        """The bank in the canonical ``[K, C_out, C_in/g, k, k]`` layout (dequantized if int8).

        Every layout is a rearrangement of the canonical tensor's elements, so laying out their
        indices gives each stored element's canonical position.
        """
        if self.weight_int8 is not None:
            return self.weight_int8()
        shape = (self.kernel_num, self.out_channels, self.in_channels // self.groups,
                 self.kernel_size, self.kernel_size)
        index = self.layout_weight(torch.arange(self.weight.numel()).reshape(shape))
        canonical = torch.empty(self.weight.numel(), dtype=self.weight.dtype)
        canonical[index.reshape(-1)] = self.weight.detach().reshape(-1)
        return canonical.reshape(shape)

    def bank(self) -> torch.Tensor:
        """The kernel bank in this form's layout: ``weight``, or the int8 bank dequantized."""
        if self.weight_int8 is None:
            return self.weight
        return self.layout_weight(self.weight_int8())

    def store_bank_int8(self) -> None:
        """Store the bank int8 per output channel (:class:`~odconv_deploy.quantize.Int8Weight`).

        The layer then computes with the dequantized bank; ``weight`` becomes None.
        """
        from odconv_deploy.quantize import BANK_CHANNEL_AXIS, Int8Weight

        if self.weight_int8 is not None:
            return
        bank = Int8Weight(self.canonical_weight(), BANK_CHANNEL_AXIS)
        del self.weight
        self.register_parameter("weight", None)
        self.weight_int8 = bank

    def extra_repr(self) -> str:
        """Constructor arguments and strategy, as shown by ``print(model)``."""
        heads = [n for n, on in (("filter", self.has_filter), ("spatial", self.has_spatial),
                                 ("kernel", self.has_kernel)) if on]
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, kernel_num={self.kernel_num}, "
            f"heads=channel+{'+'.join(heads) or 'none'}, bias={self.bias is not None}, "
            f"form={self.form!r}"
        )

    @classmethod
    def from_spec(cls, spec: ODConvSpec, output_bn: nn.BatchNorm2d | None = None,
                  **options: object) -> ODConv2dDeploy:
        """Build the deploy form of a train layer (read by :func:`inspect_odconv`).

        Args:
            spec: The train layer's configuration and tensors.
            output_bn: A BatchNorm2d that directly follows the layer, to fold in.
            **options: Constructor options of the form (e.g. ``block`` for ``ort_nchwc``).
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
            bias=output_bn is not None, **options,
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
        # keepdim: XNNPACK delegates only the 4-D mean (without it, every layer's attention
        # leaves the delegate and splits the ExecuTorch graph).
        hidden = torch.relu(self.attention_fc(x.mean(dim=(2, 3), keepdim=True)
                                              .reshape(-1, self.in_channels)))
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
                         self.attention_fc.weight.dtype)

    def _finish(self, out: torch.Tensor, filt: torch.Tensor | None) -> torch.Tensor:
        """Apply the filter attention ``[B, C_out]`` (if any) and the bias to the output."""
        if filt is not None:
            out = out * filt.reshape(-1, self.out_channels, 1, 1)
        if self.bias is not None:
            out = out + self.bias.reshape(self.out_channels, 1, 1)
        return out


class Im2colODConv2d(ODConv2dDeploy):
    """Deploy form: one-hot-conv im2col, then a per-sample, per-group batched matmul.

    The kernel bank is stored in ``linear`` layout, ``[C_out*C_in/g*k*k, K]``, so the kernel
    aggregation is one fully-connected op (delegated by XNNPACK; one pass over the weights in
    ONNX Runtime). Channel and filter attention go to whichever side is smaller: the
    activations or the per-sample weight.
    """

    form = "im2col"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs: object
                 ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        # Derived constant (not saved): tiles a per-sample factor over the weight's columns.
        self.register_buffer("column_ones", torch.ones(1, 1, in_channels // self.groups,
                                                       self.taps), persistent=False)

    def weight_shape(self) -> tuple[int, ...]:  # noqa: D102 - see base class
        return (self.out_channels * self.in_channels // self.groups * self.taps,
                self.kernel_num)

    def layout_weight(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return weight.reshape(self.kernel_num, -1).t()

    def aggregated_weight(self, att: Attentions) -> torch.Tensor:
        """Kernel aggregation, one fully-connected op over the bank: ``[B or 1, N]``."""
        bank = self.bank()
        return F.linear(att.kernel, bank) if att.kernel is not None else bank.t()

    def _column_scale(self, att: Attentions, channel_on_weight: bool) -> torch.Tensor | None:
        """Per-sample factor of the weight's columns, ``[B, g or 1, 1, C_in/g*k*k]``, or None.

        Built by broadcasting (no expand: XNNPACK does not delegate it), batch axis as ``-1``
        (XNNPACK does not delegate a reshape to a symbolic batch size).
        """
        g, cin_g, taps = self.groups, self.in_channels // self.groups, self.taps
        if channel_on_weight:
            scale = att.channel.reshape(-1, g, cin_g, 1)
            if att.spatial is not None:
                scale = scale * att.spatial.reshape(-1, 1, 1, taps)
            elif taps > 1:
                scale = scale * self.column_ones
        elif att.spatial is not None:
            scale = att.spatial.reshape(-1, 1, 1, taps) * self.column_ones
        else:
            return None
        return scale.reshape(-1, scale.shape[1], 1, cin_g * taps)

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
            x = x * att.channel.reshape(-1, self.in_channels, 1, 1)
        scale = self._column_scale(att, channel_on_weight)
        if scale is not None:
            weight = weight * scale
        filter_on_weight = att.filter is not None and out_pixels > cin_g * taps
        if filter_on_weight:
            weight = weight * att.filter.reshape(-1, g, cout_g, 1)
        # Whether the weight now has a batch axis (or is still the one shared kernel).
        per_sample = att.kernel is not None or scale is not None or filter_on_weight
        cols = im2col(x, self.tap_kernel, self.kernel_size, self.stride, self.padding,
                      self.dilation)
        # Sizes as traced values and -1 only on the pixel axis: a product of traced sizes
        # becomes an op that coremltools fails to convert.
        batch, out_h, out_w = cols.shape[0], cols.shape[2], cols.shape[3]
        if self.depthwise:
            # Depthwise: multiply-accumulate over the k*k taps of each channel.
            cols = cols.reshape(batch, self.out_channels, taps, -1)
            weight = weight.reshape(-1, self.out_channels, taps, 1)
            out = (cols * weight).sum(dim=2)
        elif not per_sample:  # one weight for the whole batch: a static grouped 1x1 conv
            out = F.conv2d(cols, weight.reshape(self.out_channels, cin_g * taps, 1, 1),
                           groups=g)
        elif g == 1:  # [B, C_out, C_in*k*k] @ [B, C_in*k*k, H*W]: a bmm, no broadcast copy
            out = torch.bmm(weight.reshape(-1, cout_g, cin_g * taps),
                            cols.reshape(batch, cin_g * taps, -1))
        else:
            out = weight @ cols.reshape(batch, g, cin_g * taps, -1)
        out = out.reshape(batch, self.out_channels, out_h, out_w)
        return self._finish(out, None if filter_on_weight else att.filter)


class DepthwiseTapsODConv2d(Im2colODConv2d):
    """Deploy form for depthwise layers: a multiply-add over ``k*k`` shifted views of the input.

    Depthwise im2col writes ``k*k`` copies of the activation and runs a one-hot conv with
    ``k*k`` outputs per channel; here each tap is a slice of the padded input scaled by the
    per-sample ``[B, C]`` weight of that tap, and the taps are summed. Any batch, rank <= 4,
    same kernel-bank layout as ``im2col``. Only for depthwise layers.

    With a stride ``s > 1`` the taps are not read with strided slices (ExecuTorch runs those
    outside XNNPACK, ONNX Runtime slowly): the padded input is first split into its ``s*s``
    phases, each a static 1x1 depthwise conv with stride ``s`` and weight 1 (exact copies),
    and every tap is then a contiguous slice of one phase. Twice as fast in XNNPACK for the
    stride-2 layers of MobileNetV2 (``runtime_bench/results/depthwise_forms.md``).
    """

    form = "depthwise_taps"

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
        # Derived constant (not saved): the identity depthwise kernel that extracts a phase.
        self.register_buffer("phase_kernel", torch.ones(in_channels, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference-mode forward."""
        self._check(x)
        att = self.attentions(x)
        channels, taps = self.out_channels, self.taps
        weight = (self.aggregated_weight(att).reshape(-1, channels, taps)
                  * att.channel.reshape(-1, channels, 1))
        if att.spatial is not None:
            weight = weight * att.spatial.reshape(-1, 1, taps)
        return self._finish(self.multiply_taps(x, weight), att.filter)

    def multiply_taps(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The depthwise conv of ``x`` with a per-sample ``[B, C, k*k]`` weight, tap by tap.

        The taps are read from flattened maps: with the rows of the padded input (of one of its
        phases, for a stride ``s > 1``) laid end to end, tap ``(r, c)`` of all output pixels is
        one contiguous run of the last axis from ``r * pitch + c``, a plain copy per channel
        instead of a 2-D window (15-25% faster in XNNPACK at stride 1); the ``pitch - W_out``
        values computed past each row's end are cropped once, at the end. The input is padded
        to whole phases plus ``s`` more rows, which the last taps' runs reach into.
        """
        k, s, d, p = self.kernel_size, self.stride, self.dilation, self.padding
        channels = self.in_channels
        out_h, out_w = self.output_size(x.shape[2], x.shape[3])
        height, width = x.shape[2] + 2 * p, x.shape[3] + 2 * p
        extra_w, extra_h = (-width) % s, (-height) % s + s
        padded = F.pad(x, (p, p + extra_w, p, p + extra_h))
        pitch = (width + extra_w) // s
        length = out_h * pitch
        flat: dict[tuple[int, int], torch.Tensor] = {}
        out = None
        for t in range(self.taps):
            row, col = divmod(t, k)
            row, col = row * d, col * d  # offsets in the padded input
            phase = (row % s, col % s)
            if phase not in flat:
                source = padded
                if s > 1:
                    shifted = padded[:, :, phase[0]:, phase[1]:] if any(phase) else padded
                    source = F.conv2d(shifted, self.phase_kernel, None, s, groups=channels)
                flat[phase] = source.reshape(-1, channels, source.shape[2] * source.shape[3])
            begin = row // s * pitch + col // s
            # [B, C, 1]: a slice, not an index (a select, which XNNPACK does not delegate)
            term = flat[phase][:, :, begin:begin + length] * weight[:, :, t:t + 1]
            out = term if out is None else out + term
        out = out.reshape(-1, channels, out_h, pitch)
        return out if pitch == out_w else out[:, :, :, :out_w]


class DynamicLinearODConv2d(Im2colODConv2d):
    """Deploy form for XNNPACK: im2col in channels-last order, then a run-time-weight linear.

    XNNPACK takes no conv whose filter is computed at run time, but its fully-connected op
    takes a run-time weight (packed per inference). Here the ``k*k`` shifted views of the
    channels-last input are concatenated into ``[H*W, k*k*C_in]`` columns and multiplied by
    the per-sample ``[C_out, k*k*C_in]`` weight in one linear: no one-hot conv, no ``9x``
    transposes between layouts, no packing of the ``9x`` columns (``bmm`` packs its second
    operand, the columns; the linear packs the weight). It wins where the weight is the
    smaller operand (``C_out`` below the output pixels: early layers) and loses where it is
    not, so ``tune`` chooses it per layer, for fixed-batch ExecuTorch programs. The bank is
    stored tap-major (``[C_out*k*k*C_in, K]``) to match the columns. Regular convs with
    stride 1 only; one linear per sample, so exported graphs have a fixed batch.
    """

    form = "dynamic_linear"
    supports_dynamic_batch = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs: object
                 ) -> None:
        groups, stride = int(kwargs.get("groups", 1)), int(kwargs.get("stride", 1))
        if groups != 1 or stride != 1:
            raise UnsupportedLayerError(
                f"Strategy 'dynamic_linear' takes regular stride-1 convs only (groups == 1, "
                f"stride == 1); got in={in_channels}, out={out_channels}, groups={groups}, "
                f"stride={stride}. Note: use 'im2col', or strategy='tune', which offers it "
                "where it fits.")
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)

    def layout_weight(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return weight.permute(0, 1, 3, 4, 2).reshape(self.kernel_num, -1).t()

    def _columns(self, x: torch.Tensor) -> torch.Tensor:
        """``[H_out*W_out, k*k*C_in]``: the channels-last im2col of one sample, tap-major."""
        k, p, d = self.kernel_size, self.padding, self.dilation
        out_h, out_w = self.output_size(x.shape[2], x.shape[3])
        padded = (F.pad(x, (p, p, p, p)) if p else x).permute(0, 2, 3, 1)
        if k == 1:
            return padded.reshape(-1, self.in_channels)
        views = [padded[:, r * d:r * d + out_h, c * d:c * d + out_w, :]
                 for r in range(k) for c in range(k)]
        return torch.cat(views, dim=3).reshape(-1, self.taps * self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference-mode forward."""
        self._check(x)
        att = self.attentions(x)
        cout, cin, taps = self.out_channels, self.in_channels, self.taps
        out_h, out_w = self.output_size(x.shape[2], x.shape[3])
        scale = att.channel.reshape(-1, 1, 1, cin)
        if att.spatial is not None:
            scale = scale * att.spatial.reshape(-1, 1, taps, 1)
        weight = self.aggregated_weight(att).reshape(-1, cout, taps, cin) * scale
        filter_on_weight = att.filter is not None and out_h * out_w > taps * cin
        if filter_on_weight:
            weight = weight * att.filter.reshape(-1, cout, 1, 1)
        weight = weight.reshape(-1, cout, taps * cin)
        outs = []
        single = x.shape[0] == 1  # batch 1: reshapes, not per-sample indexing (see above)
        for b in range(x.shape[0]):
            xb, wb = (x, weight.reshape(cout, -1)) if single else (x[b:b + 1], weight[b])
            # No bias in the linear: ExecuTorch 1.5's XNNPACK runtime crashes on a
            # fully-connected op with a run-time weight and a constant bias.
            out = F.linear(self._columns(xb), wb)
            if att.filter is not None and not filter_on_weight:
                out = out * (att.filter.reshape(1, cout) if single else att.filter[b:b + 1])
            if self.bias is not None:
                out = out + self.bias
            # contiguous: a permuted output keeps channels-last strides through the next
            # ops, and torch.export then writes an as_strided copy (outside XNNPACK).
            outs.append(out.reshape(1, out_h, out_w, cout).permute(0, 3, 1, 2).contiguous())
        return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]


class DynamicWeightODConv2d(ODConv2dDeploy):
    """Deploy form: per sample, one conv whose weight is aggregated at run time.

    Exact at any batch in PyTorch; an export unrolls the per-sample loop, so exported graphs
    have a fixed batch (batch 1 is the intended use: ONNX Conv and CoreML conv accept a
    computed weight).

    The per-sample weight is scaled as a ``[C_out, C_in/g*k*k]`` matrix: one column scale
    (spatial attention tiled over the input channels, times the channel attention when
    ``groups == 1``) and, where cheaper than on the output, one row scale (filter attention).
    Broadcasting a ``[1, 1, k, k]`` spatial factor over a 4-D weight instead hits ONNX
    Runtime's slow short-span broadcast (figures: ``runtime_bench/results/auto_rules.md``).
    The bias goes into the conv unless the filter attention is applied after it.
    """

    form = "dynamic_weight"
    supports_dynamic_batch = False

    def _channel_on_weight(self, pixels: int) -> bool:
        """Channel attention goes on the weight when that costs no extra pass, or less."""
        if self.groups != 1 and not self.depthwise:
            return False  # grouped: a weight column belongs to one input channel per group
        columns = self.in_channels // self.groups * self.taps
        extra_weight_pass = not self.has_spatial and not self.depthwise
        return not extra_weight_pass or self.out_channels * columns <= self.in_channels * pixels

    def _per_sample_convs(
        self, x: torch.Tensor, att: Attentions, bank: torch.Tensor, channel_on_weight: bool,
        bias_in_conv: bool,
        conv_weight: Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]],
                              torch.Tensor],
    ) -> torch.Tensor:
        """One conv per sample, on ``conv_weight(aggregated kernel, sample)``, then the filter.

        ``bank`` is ``[K, N]``; ``sample(t)`` picks the current sample's row of a per-sample
        tensor. The channel attention scales the input unless ``channel_on_weight``.
        """
        # All samples' kernels in one product: the bank is read once, not once per sample.
        aggregated = att.kernel @ bank if att.kernel is not None else None
        outs = []
        # Batch 1: reshapes, not per-sample indexing (each Gather or Slice is a node, and a
        # copy of the activation, in ONNX).
        single = x.shape[0] == 1
        for b in range(x.shape[0]):
            def sample(t: torch.Tensor, b: int = b) -> torch.Tensor:
                return t.reshape(-1) if single else t[b]

            kernel = bank.reshape(-1) if aggregated is None else sample(aggregated)
            weight = conv_weight(kernel, sample)
            xb = x if single else x[b:b + 1]
            if not channel_on_weight:
                xb = xb * sample(att.channel).reshape(1, -1, 1, 1)
            outs.append(F.conv2d(xb, weight, self.bias if bias_in_conv else None,
                                 self.stride, self.padding, self.dilation, self.groups))
        out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
        return out if bias_in_conv else self._finish(out, att.filter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference-mode forward."""
        self._check(x)
        att = self.attentions(x)
        k, cout, cin_g = self.kernel_size, self.out_channels, self.in_channels // self.groups
        columns = cin_g * self.taps
        out_h, out_w = self.output_size(x.shape[2], x.shape[3])
        channel_on_weight = self._channel_on_weight(x.shape[2] * x.shape[3])
        filter_on_weight = att.filter is not None and columns <= out_h * out_w

        def conv_weight(kernel: torch.Tensor, sample: Callable[[torch.Tensor], torch.Tensor]
                        ) -> torch.Tensor:
            weight = kernel.reshape(cout, columns)
            rows = sample(att.filter) if filter_on_weight else None
            cols = None  # [C_in/g, k*k], flattened to match the weight's columns
            if channel_on_weight and self.depthwise:
                rows = sample(att.channel) if rows is None else rows * sample(att.channel)
            elif channel_on_weight:
                cols = sample(att.channel).reshape(cin_g, 1).expand(cin_g, self.taps)
            if att.spatial is not None:
                spatial = sample(att.spatial).reshape(1, self.taps)
                cols = spatial.expand(cin_g, self.taps) if cols is None else cols * spatial
            if cols is not None:
                weight = weight * cols.reshape(1, columns)
            if rows is not None:
                weight = weight * rows.reshape(cout, 1)
            return weight.reshape(cout, cin_g, k, k)

        bank = self.bank().reshape(self.kernel_num, -1)
        return self._per_sample_convs(x, att, bank, channel_on_weight,
                                      att.filter is None or filter_on_weight, conv_weight)


class StaticWeightODConv2d(ODConv2dDeploy):
    """Deploy form with constant conv weights: attentions act on activations only.

    im2col columns (one-hot conv, channel-major) are scaled by channel x spatial attention
    and fed to one static grouped 1x1 conv that produces every kernel's output (``[K*C_out]``),
    which the kernel attention then mixes. 1x1 layers skip im2col and use a strided static
    conv. Weight layout: ``[groups*K*C_out/g, C_in/g*k*k, 1, 1]``.
    """

    form = "static_weight"

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
            out = F.conv2d(x * scale[:, :, None, None], self.bank(), None, self.stride,
                           self.padding, 1, self.groups)
        else:
            cols = im2col(x, self.tap_kernel, self.kernel_size, self.stride, self.padding,
                          self.dilation)
            scale = att.channel[:, :, None]
            if att.spatial is not None:
                scale = scale * att.spatial[:, None, :]  # [B, C_in, k*k], channel-major
            cols = cols * scale.reshape(batch, -1, 1, 1)
            out = F.conv2d(cols, self.bank(), None, 1, 0, 1, self.groups)
        if self.kernel_num > 1:
            out_h, out_w = out.shape[2], out.shape[3]
            out = out.reshape(batch, self.groups, self.kernel_num, -1)
            if att.kernel is not None:
                out = out * att.kernel[:, None, :, None]
            out = out.sum(dim=2).reshape(batch, self.out_channels, out_h, out_w)
        return self._finish(out, att.filter)


#: Deploy strategies by name: forms that take every ODConv layer.
DEPLOY_STRATEGIES: dict[str, type[ODConv2dDeploy]] = {
    cls.form: cls for cls in (Im2colODConv2d, DynamicWeightODConv2d, StaticWeightODConv2d)
}
DEFAULT_STRATEGY = "im2col"
