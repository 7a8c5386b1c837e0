"""ONNX Runtime CPU deploy form: the computed weight runs ORT's blocked (NCHWc) conv kernels.

ONNX Runtime reorders only *constant* conv weights into the NCHWc layout of its fast CPU
kernels; a standard ``Conv`` whose weight is computed at run time takes the generic im2col +
GEMM path (depthwise: one small GEMM per channel). Its contrib op ``com.microsoft.nchwc.Conv``
reads the weight from its input, though, so this form keeps the kernel bank in the blocked
layout and aggregates and scales it there, and the ONNX export replaces its conv with that op
between ``ReorderInput`` and ``ReorderOutput`` (:mod:`export.nchwc_graph`), then keeps the
maps blocked from one such conv to the next wherever the ops between can read them so
(:mod:`export.nchwc_chains`; an
inverted residual block runs blocked end to end). This brings depthwise layers and
od_resnet18's convs close to the static twin's kernels; 1x1 convs gain only inside such
chains (alone, the reorders around them cost what the kernel saves). The measurements:
``runtime_bench/results/auto_rules.md``, ``depthwise_forms.md`` and docs/performance.md.

The block size is the CPU's (8 with AVX2, 16 with AVX-512): a graph is built for one block,
records it (``ort_nchwc_block`` in the ONNX metadata) and carries a guard that makes ONNX
Runtime fail (a Reshape error) instead of computing garbage on a CPU with another block.
Eager PyTorch runs the same arithmetic through an ordinary conv on the unblocked weight, which
is what the float64 equivalence tests check.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from odconv_deploy.errors import UnsupportedLayerError
from odconv_deploy.layers.deploy import DynamicWeightODConv2d
from odconv_deploy.layers.odconv import Attentions, is_depthwise

#: ONNX domain of ONNX Runtime's NCHWc kernels.
NCHWC_DOMAIN = "com.microsoft.nchwc"
#: ONNX metadata key holding the block size a graph was built for.
BLOCK_METADATA_KEY = "ort_nchwc_block"
#: Channels of a regular conv's maps must be multiples of this (ORT's ReorderInput); the
#: blocked maps are padded to whole blocks.
CHANNEL_ALIGNMENT = 4
#: Values per broadcast span sought where a per-channel factor meets a blocked tensor.
MAX_SPAN = 256


@functools.cache
def ort_nchwc_block() -> int | None:
    """ONNX Runtime's NCHWc block size on this machine, or None where it has no NCHWc kernels.

    Read from ORT itself: ``ReorderInput`` pads a 4-channel tensor to one block.
    """
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    graph = helper.make_graph(
        [helper.make_node("ReorderInput", ["x"], ["y"], domain=NCHWC_DOMAIN)], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(NCHWC_DOMAIN, 1)])
    model.ir_version = 8  # any onnxruntime of the supported range reads it
    try:
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {"x": np.zeros((1, 4, 1, 1), np.float32)})
    except Exception:  # noqa: BLE001 - no NCHWc kernels in this build or on this CPU
        return None
    block = int(out.shape[1])
    return block if block > 1 else None


def span_tile(count: int, block: int) -> int:
    """How many blocks one broadcast span of a per-channel factor takes in a blocked tensor.

    A factor per channel repeats every ``block`` values in the blocked layout (the channel
    is the last axis); ONNX Runtime's broadcast over such short spans takes 2.7x the time of
    a long-span Mul of the same size (measured), so the factor is tiled to ``tile * block``
    values: ``tile`` is the largest divisor of ``count`` (the blocks in a row) that keeps the
    span within :data:`MAX_SPAN`.
    """
    return max(t for t in range(1, MAX_SPAN // block + 1) if count % t == 0)


def _pad_to(vector: torch.Tensor, length: int) -> torch.Tensor:
    """A 1-D per-channel factor zero-padded to ``length`` (the blocked channels)."""
    return F.pad(vector, (0, length - vector.shape[-1])) if vector.shape[-1] < length else vector


def nchwc_unsupported_reason(in_channels: int, out_channels: int, kernel_size: int,
                             groups: int, block: int) -> str | None:
    """Why a conv cannot take the NCHWc form with ``block``, or None if it can."""
    if is_depthwise(in_channels, out_channels, groups):
        if in_channels % block:
            return f"depthwise channels {in_channels} are not a multiple of the block {block}"
        return None
    if groups != 1:
        return f"grouped convs (groups={groups}) other than depthwise are not supported"
    if in_channels % CHANNEL_ALIGNMENT or out_channels % CHANNEL_ALIGNMENT:
        return (f"channels {in_channels} -> {out_channels} are not multiples of "
                f"{CHANNEL_ALIGNMENT} (ONNX Runtime reorders only such maps)")
    return None


def padded_channels(channels: int, block: int) -> int:
    """``channels`` rounded up to whole blocks: the channels of its blocked map."""
    return -(-channels // block) * block


def block_output_channels(weight: torch.Tensor, block: int) -> torch.Tensor:
    """``[..., C_out, C, k, k]`` -> ``[..., C_out/b, C, k, k, b]`` (ORT's OIHWBo filter layout).

    The layout of depthwise NCHWc convs, and of regular ones that read an NCHW input.
    """
    *lead, cout, cin, kh, kw = weight.shape
    n = len(lead)
    blocked = weight.reshape(*lead, cout // block, block, cin, kh, kw)
    return blocked.permute(*range(n), n, n + 2, n + 3, n + 4, n + 1)


def block_weight(weight: torch.Tensor, block: int, depthwise: bool) -> torch.Tensor:
    """``[..., C_out, C_in/g, k, k]`` -> the NCHWc filter layout, same leading axes.

    Regular convs: ``[C_out/b, C_in/b, k, k, b_in, b_out]`` (ORT's OIHWBiBo); depthwise:
    ``[C/b, k, k, b]`` (OIHWBo, :func:`block_output_channels` without its unit axis).
    """
    *lead, cout, cin_g, kh, kw = weight.shape
    n = len(lead)
    if depthwise:
        return block_output_channels(weight, block).squeeze(n + 1)
    blocked = weight.reshape(*lead, cout // block, block, cin_g // block, block, kh, kw)
    return blocked.permute(*range(n), n, n + 2, n + 4, n + 5, n + 3, n + 1)


def unblock_weight(blocked: torch.Tensor, cout: int, cin_g: int, kernel_size: int, block: int,
                   depthwise: bool) -> torch.Tensor:
    """Inverse of :func:`block_weight` for one flat blocked weight: ``[C_out, C_in/g, k, k]``."""
    k = kernel_size
    if depthwise:
        return blocked.reshape(cout // block, k, k, block).permute(0, 3, 1, 2).reshape(
            cout, 1, k, k)
    blocked = blocked.reshape(cout // block, cin_g // block, k, k, block, block)
    return blocked.permute(0, 5, 1, 4, 2, 3).reshape(cout, cin_g, k, k)


class OrtNchwcODConv2d(DynamicWeightODConv2d):
    """Deploy form for ONNX Runtime CPU: per sample, a conv on a weight computed in NCHWc layout.

    Same per-sample structure as ``dynamic_weight`` (fixed batch once exported). The kernel
    bank is stored blocked (``[K, C_out*C_in/g*k*k]`` in the order of :func:`block_weight`),
    so the aggregation writes the layout the kernel reads. Channel and spatial attention
    scale the weight through one small factor laid out like one row block of it (one block
    of output channels); the channel attention of a 1x1 conv scales the input instead where
    that is smaller (as ``dynamic_weight`` decides). The filter attention scales the output,
    except on a 1x1 conv whose input channels are fewer than its output pixels: there it
    scales the weight, its factor tiled to long spans (:func:`span_tile`).

    Regular (``groups == 1``) convs with channels in multiples of 4, and depthwise convs with
    channels in whole blocks. A regular conv whose channels are not whole blocks is padded:
    its bank holds zero filters for the padding channels (``blocked_in`` x ``blocked_out``),
    both attentions then scale the weight, and the eager conv crops the padding off.

    Args:
        block: NCHWc block size (default: this machine's, read from ONNX Runtime).
        **kwargs: As :class:`ODConv2dDeploy`.
    """

    form = "ort_nchwc"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 block: int | None = None, **kwargs: object) -> None:
        if block is None:
            block = ort_nchwc_block()
            if block is None:
                raise UnsupportedLayerError(
                    "Strategy 'ort_nchwc' needs ONNX Runtime with NCHWc CPU kernels, which "
                    "this machine's onnxruntime does not offer. Note: use 'dynamic_weight'.")
        groups = int(kwargs.get("groups", 1))
        reason = nchwc_unsupported_reason(in_channels, out_channels, kernel_size, groups, block)
        if reason:
            raise UnsupportedLayerError(
                f"Strategy 'ort_nchwc' cannot take the conv {in_channels} -> {out_channels}, "
                f"kernel {kernel_size}, groups {groups}: {reason}. Note: use strategy='auto' "
                "with target 'onnxruntime', which applies it where it fits.")
        self.block = block
        # The blocked maps' channels: whole blocks, zero-padded (regular convs only).
        regular = not is_depthwise(in_channels, out_channels, groups)
        self.blocked_in = padded_channels(in_channels, block) if regular else in_channels
        self.blocked_out = padded_channels(out_channels, block) if regular else out_channels
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        # Derived constant (not saved): spreads the channel factor over the taps and the
        # output channels of a row block ([1, k*k, 1, b_out]; depthwise [1, k*k, 1]).
        shape = (1, self.taps, 1) if self.depthwise else (1, self.taps, 1, block)
        self.register_buffer("block_ones", torch.ones(shape), persistent=False)

    @property
    def padded(self) -> bool:
        """Whether the blocked maps carry padding channels (channels not in whole blocks)."""
        return (self.blocked_in, self.blocked_out) != (self.in_channels, self.out_channels)

    def weight_shape(self) -> tuple[int, ...]:  # noqa: D102 - see base class
        return (self.kernel_num,
                self.blocked_out * self.blocked_in // self.groups * self.taps)

    def layout_weight(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.padded:  # the padding channels' filters and taps are zero
            weight = F.pad(weight, (0, 0, 0, 0, 0, self.blocked_in - self.in_channels,
                                    0, self.blocked_out - self.out_channels))
        return block_weight(weight, self.block, self.depthwise).reshape(self.kernel_num, -1)

    def canonical_weight(self) -> torch.Tensor:  # noqa: D102 - see base class
        if self.weight_int8 is not None:
            return self.weight_int8()
        cin_g = self.blocked_in // self.groups
        kernels = [unblock_weight(kernel, self.blocked_out, cin_g, self.kernel_size,
                                  self.block, self.depthwise)
                   for kernel in self.weight.detach()]
        return torch.stack(kernels)[:, :self.out_channels, :self.in_channels // self.groups]

    def extra_repr(self) -> str:  # noqa: D102
        return f"{super().extra_repr()}, block={self.block}"

    def _weight_scale(self, att: Attentions, sample: Callable[[torch.Tensor], torch.Tensor]
                      ) -> torch.Tensor:
        """Channel x spatial factor of one blocked row block, flattened to ``[1, n]``.

        Laid out ``[C_in/b, k*k, b_in, b_out]`` (depthwise ``[C/b, k*k, b]``): input channel
        ``c`` sits at ``[c // b, :, c % b]``, tap ``t`` on axis 1.
        """
        b, taps = self.block, self.taps
        channel_shape = (-1, 1, b) if self.depthwise else (-1, 1, b, 1)
        channel = _pad_to(sample(att.channel), self.blocked_in)
        scale = self.block_ones * channel.reshape(channel_shape)
        if att.spatial is not None:
            spatial_shape = (1, taps, 1) if self.depthwise else (1, taps, 1, 1)
            scale = scale * sample(att.spatial).reshape(spatial_shape)
        return scale.reshape(1, -1)

    def _scale_rows(self, kernel: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
        """The blocked kernel with output channel ``o`` scaled by ``filt[o]``.

        The factor is tiled to long broadcast spans (:func:`span_tile`).
        """
        b, rows = self.block, self.blocked_out // self.block
        per_row = self.blocked_in // self.groups * self.taps  # values per row block / b
        tile = span_tile(per_row, b)
        factor = _pad_to(filt, self.blocked_out).reshape(rows, 1, 1, b)
        factor = factor.expand(rows, 1, tile, b).reshape(rows, 1, -1)
        return kernel.reshape(rows, per_row // tile, tile * b) * factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference-mode forward."""
        self._check(x)
        att = self.attentions(x)
        cin_g = self.in_channels // self.groups
        # With a spatial factor the weight is scaled anyway, so the channel factor joins it.
        # With padding channels, both attentions scale the weight: the maps between layers
        # stay blocked only where no per-channel op on a padded map is left in between.
        channel_on_weight = (att.spatial is not None or self.padded
                             or self._channel_on_weight(x.shape[2] * x.shape[3]))
        out_h, out_w = self.output_size(x.shape[2], x.shape[3])
        filter_on_weight = att.filter is not None and (
            self.padded or (self.kernel_size == 1 and self.in_channels <= out_h * out_w))

        def conv_weight(kernel: torch.Tensor, sample: Callable[[torch.Tensor], torch.Tensor]
                        ) -> torch.Tensor:
            if channel_on_weight:  # each row: one block of output channels
                scale = self._weight_scale(att, sample)
                kernel = kernel.reshape(-1, scale.shape[1]) * scale
            if filter_on_weight:
                kernel = self._scale_rows(kernel, sample(att.filter))
            # Exported as Reshape -> Transpose -> Reshape [-> Slice] -> Conv, which the ONNX
            # export rewrites to ORT's NCHWc ops on the blocked weight (export/nchwc_graph.py).
            weight = unblock_weight(kernel, self.blocked_out, self.blocked_in // self.groups,
                                    self.kernel_size, self.block, self.depthwise)
            return weight[:self.out_channels, :cin_g] if self.padded else weight

        return self._per_sample_convs(x, att, self.bank(), channel_on_weight,
                                      att.filter is None or filter_on_weight, conv_weight)
