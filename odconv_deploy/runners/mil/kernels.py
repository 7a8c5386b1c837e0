"""The op kernels of the MIL reference executor: one NumPy function per MIL op type.

The kernel table (``_KERNELS``, ``op_type -> function``) and :data:`SUPPORTED_OPS`, the op
context kernels read their inputs through, the prechecks that refuse undocumented modes
before anything runs, and the errors kernels raise. How values are stored and rounded is
described in :mod:`odconv_deploy.runners.mil.executor`; the op semantics modelled here:

- Padding ``same`` for conv and pooling follows the TensorFlow rule that coremltools' shape
  inference uses: total padding ``max((ceil(d/s) - 1)*s + (k - 1)*dil + 1 - d, 0)``, the odd
  element after (``same``) or before (``same_lower``).
- Pooling output sizes are coremltools' (under ``ceil_mode`` the last window is dropped only
  when there is explicit padding); a window wholly past the input is refused. ``avg_pool``
  divides by the full kernel, ``ceil_mode`` overhang included, unless
  ``exclude_padding_from_average`` (then by the input elements in the window): Core ML's rule,
  which differs from PyTorch's ``count_include_pad`` on edge windows under ``ceil_mode``.
- ``layer_norm``: ``gamma`` / ``beta`` have the shape ``x.shape[axes]`` (axes ascending) and
  broadcast over the other axes, whichever axes are normalised.
- ``reshape``: each ``0`` copies the input dim matched from the right, ``1`` when out of range
  (the iOS17 definition; earlier opsets allow a 0 only with equal ranks, where it agrees).
- ``topk``: ties keep the lower index first (a stable sort), ``ascending`` and ``sort`` as
  defined; constexpr ops (compressed weights) take the value coremltools' op definition
  materialises (``materialized_val_inference``), the decompression Core ML performs at load.
- ``cast`` from float to integer, and ``real_div`` on integers (shape arithmetic), truncate
  toward zero (the quotient is cast to the declared integer dtype).
- Resizing (``upsample_*``, ``resize_*``, iOS17 ``resize``) follows the sampling grids of
  coremltools' MIL op definitions: ``upsample_bilinear`` recomputes the spacing from the output
  size (``align_corners=True``: ``(in-1)/(out-1)``; ``False``: half-pixel ``in/out``),
  ``resize_bilinear`` implements the five documented ``sampling_mode`` grids.
  ``upsample_nearest_neighbor`` reads ``floor(i*in/out)`` (for fractional scales that is the
  CPU behaviour coremltools' op test pins; its GPU variant is marked failing), nearest-neighbour
  resizing to a target size the half-pixel index ``floor((i+0.5)*in/out)``. Bilinear weights
  and sums are float32, rounded once (like conv). Cases without a documented rule
  (``align_corners`` equal to ``half_pixel_centers``, nearest ``resize`` with a non-DEFAULT
  sampling mode, a nearest index that float32 rounding would move, ...) raise
  :class:`UnsupportedMILOpError` naming the op and mode instead of guessing.
- ``conv_transpose`` accumulates in float32; ``same`` padding crops the full result the TF way
  (the odd element after), and an ``output_shape`` must agree with ``valid``/``custom`` sizes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.runners.mil.loader import _as_value, _is_int_dim

if TYPE_CHECKING:  # coremltools is an optional backend; import it only where it is used
    from coremltools.converters.mil.mil import Operation, Var

__all__ = ["SUPPORTED_OPS", "MILExecutionError", "UnsupportedMILOpError"]


class UnsupportedMILOpError(ODConvDeployError, NotImplementedError):
    """The MIL program holds op types that the reference executor has no kernel for."""


class MILExecutionError(ODConvDeployError, RuntimeError):
    """An op failed while executing, or produced a value that contradicts its declared type."""


# --------------------------------------------------------------------------------------------
# Op context: how kernels read their inputs
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _floating(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


class _OpContext:
    """The inputs of one op, resolved to NumPy values.

    ``per_term``: the op's result is fp16 and the executor models fp16 accumulation, so the
    accumulating kernels round their running sums to fp16 after every term.
    """

    def __init__(self, op: Operation, lookup: Callable[[Var], Any], *,
                 per_term: bool = False) -> None:
        self.op = op
        self._lookup = lookup
        self.per_term = per_term

    def has(self, name: str) -> bool:
        return self.op.inputs.get(name) is not None

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        """The value of input ``name`` (``default`` when the optional input is absent)."""
        var = self.op.inputs.get(name)
        if var is None:
            if default is _MISSING:
                raise MILExecutionError(f"required input '{name}' is missing")
            return default
        if isinstance(var, (tuple, list)):
            return [self._lookup(v) for v in var]
        return self._lookup(var)

    def tensor(self, name: str, default: Any = _MISSING) -> np.ndarray:
        """Input ``name`` as an array; floating values are widened to float32 for compute."""
        value = self.raw(name, default)
        if value is None:
            return value
        a = np.asarray(value)
        return a.astype(np.float32) if _floating(a) else a

    def tensors(self, name: str) -> list[np.ndarray]:
        """A variadic (tuple) input as a list of arrays, floats widened to float32."""
        out = []
        for value in self.raw(name):
            a = np.asarray(value)
            out.append(a.astype(np.float32) if _floating(a) else a)
        return out

    def ints(self, name: str, default: Any = _MISSING) -> list[int] | None:
        """Input ``name`` as a flat list of Python ints (``None`` stays ``None``)."""
        value = self.raw(name, default)
        if value is None:
            return None
        return [int(v) for v in np.asarray(value).reshape(-1)]

    def int(self, name: str, default: Any = _MISSING) -> int:
        value = self.raw(name, default)
        return int(np.asarray(value).reshape(-1)[0])

    def float(self, name: str, default: Any = _MISSING) -> float:
        value = self.raw(name, default)
        return float(np.asarray(value).reshape(-1)[0])

    def bool(self, name: str, default: Any = _MISSING) -> bool:
        value = self.raw(name, default)
        return bool(np.asarray(value).reshape(-1)[0])

    def bools(self, name: str, rank: int) -> list[bool]:
        value = self.raw(name, None)
        if value is None:
            return [False] * rank
        return [bool(v) for v in np.asarray(value).reshape(-1)]

    def str(self, name: str, default: Any = _MISSING) -> str:
        value = self.raw(name, default)
        return value if isinstance(value, str) else str(np.asarray(value).reshape(-1)[0])


Kernel = Callable[[_OpContext], Any]


# -- accumulation: float32 sums, or fp16 running sums rounded after every term (per_term) ----

def _round16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def _accumulate(ctx: _OpContext, terms: Iterator[np.ndarray] | Sequence[np.ndarray]
                ) -> np.ndarray:
    """The sum of ``terms`` (float32 arrays), in order; fp16 running sums under ``per_term``."""
    total = None
    for term in terms:
        total = term if total is None else total + term
        if ctx.per_term:
            total = _round16(total)
    if total is None:
        raise MILExecutionError("a sum over no terms")
    return total


def _matmul(ctx: _OpContext, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b``; under ``per_term`` a fused multiply-add per term into an fp16 running sum.

    The product of two fp16 values is exact in float32, so each step rounds once, as an fp16
    FMA does.
    """
    if not ctx.per_term or a.ndim < 2 or b.ndim < 2:
        return np.matmul(a, b)
    return _accumulate(ctx, (a[..., :, k:k + 1] * b[..., k:k + 1, :]
                             for k in range(a.shape[-1])))


def _sum(ctx: _OpContext, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``x`` summed over ``axes``; under ``per_term`` pairwise in fp16 (a tree of fp16 adds).

    A reduction over a feature map (a global average pool: tens of thousands of terms) is
    summed as a tree, as GPU reductions are; an fp16 running sum over that many terms stops
    growing once it dwarfs the terms, which no runtime does.
    """
    if not ctx.per_term:
        return np.sum(x, axis=axes)
    kept = [d for d in range(x.ndim) if d not in axes]
    flat = np.transpose(x, kept + list(axes)).reshape([x.shape[d] for d in kept] + [-1])
    while flat.shape[-1] > 1:
        if flat.shape[-1] % 2:
            flat = np.concatenate([flat, np.zeros_like(flat[..., :1])], axis=-1)
        flat = _round16(flat[..., 0::2] + flat[..., 1::2])
    return flat[..., 0]

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _k_const(ctx: _OpContext) -> Any:
    value = ctx.op.outputs[0].val
    if value is None:
        raise MILExecutionError("const op has no compile-time value")
    return _as_value(value)


_CAST_DTYPES = {
    "fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int8": np.int8,
    "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
    "int64": np.int64, "uint32": np.uint32, "bool": np.bool_,
}


def _k_cast(ctx: _OpContext) -> np.ndarray:
    dtype = ctx.str("dtype")
    if dtype not in _CAST_DTYPES:
        raise MILExecutionError(f"cast to unknown dtype '{dtype}'")
    return np.asarray(ctx.raw("x")).astype(_CAST_DTYPES[dtype])


def _k_identity(ctx: _OpContext) -> np.ndarray:
    return np.asarray(ctx.raw("x"))


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Kernel:
    def kernel(ctx: _OpContext) -> np.ndarray:
        return fn(ctx.tensor("x"), ctx.tensor("y"))

    return kernel


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Kernel:
    def kernel(ctx: _OpContext) -> np.ndarray:
        return fn(ctx.tensor("x"))

    return kernel


def _real_div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # int / int (shape arithmetic): the quotient is cast to the declared int dtype, truncating.
    return np.true_divide(x, y)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # overflow-free logistic


_erf = np.frompyfunc(math.erf, 1, 1)


def _erf_array(x: np.ndarray) -> np.ndarray:
    return np.asarray(_erf(x), dtype=np.float64).astype(x.dtype)


def _k_gelu(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    mode = ctx.str("mode", "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf_array(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        inner = np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x ** 3)
        return 0.5 * x * (1.0 + np.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(np.float32(1.702) * x)
    raise MILExecutionError(f"gelu mode '{mode}' is not one of EXACT, TANH_APPROXIMATION, "
                            "SIGMOID_APPROXIMATION")


def _k_clip(ctx: _OpContext) -> np.ndarray:
    return np.minimum(np.maximum(ctx.tensor("x"), ctx.tensor("alpha")), ctx.tensor("beta"))


def _k_threshold(ctx: _OpContext) -> np.ndarray:
    return np.maximum(ctx.tensor("x"), ctx.tensor("alpha"))


def _k_leaky_relu(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    return np.where(x >= 0, x, ctx.tensor("alpha") * x)


def _k_elu(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    return np.where(x > 0, x, ctx.tensor("alpha") * np.expm1(np.minimum(x, 0)))


def _channel_param(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """A per-channel ``[C]`` parameter broadcast against ``x`` of shape ``[B, C, *D]``."""
    if p.ndim == 0 or x.ndim < 2:
        return p
    return p.reshape((1, -1) + (1,) * (x.ndim - 2))


def _k_prelu(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    alpha = _channel_param(x, ctx.tensor("alpha"))
    return np.where(x >= 0, x, alpha * x)


def _k_clamped_relu(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    return np.minimum(np.where(x >= 0, x, ctx.tensor("alpha") * x), ctx.tensor("beta"))


def _k_thresholded_relu(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    return np.where(x >= ctx.tensor("alpha"), x, np.zeros_like(x))


def _k_linear_activation(ctx: _OpContext) -> np.ndarray:
    return ctx.tensor("alpha") * ctx.tensor("x") + ctx.tensor("beta")


def _k_sigmoid_hard(ctx: _OpContext) -> np.ndarray:
    return np.clip(ctx.tensor("alpha") * ctx.tensor("x") + ctx.tensor("beta"), 0.0, 1.0)


def _k_scaled_tanh(ctx: _OpContext) -> np.ndarray:
    return ctx.tensor("alpha") * np.tanh(ctx.tensor("beta") * ctx.tensor("x"))


def _k_softplus_parametric(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    alpha = _channel_param(x, ctx.tensor("alpha"))
    beta = _channel_param(x, ctx.tensor("beta"))
    return alpha * np.logaddexp(0.0, beta * x)


def _eps_unary(fn: Callable[[np.ndarray, np.float32], np.ndarray], eps: float) -> Kernel:
    def kernel(ctx: _OpContext) -> np.ndarray:
        return fn(ctx.tensor("x"), np.float32(ctx.float("epsilon", eps)))

    return kernel


def _k_softmax(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    axis = ctx.int("axis", -1)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _reduce_axes(ctx: _OpContext, rank: int) -> tuple[int, ...]:
    axes = ctx.ints("axes", None)
    if axes is None:
        return tuple(range(rank))
    return tuple(sorted(_axis(a, rank) for a in axes))


def _reduction(fn: Callable[[np.ndarray, tuple[int, ...]], np.ndarray] | None = None, *,
               mean: bool = False) -> Kernel:
    """A reduce op: ``fn(x, axes)``, or (``fn`` None) a sum, or a mean, through :func:`_sum`."""
    def kernel(ctx: _OpContext) -> np.ndarray:
        x = ctx.tensor("x")
        axes = _reduce_axes(ctx, x.ndim)
        if fn is not None:
            out = fn(x, axes)
        else:
            out = _sum(ctx, x, axes)
            if mean:
                out = out / np.float32(math.prod(x.shape[a] for a in axes))
        if ctx.bool("keep_dims", False):
            out = np.expand_dims(out, axes)
        return out

    return kernel


def _reduce_arg(fn: Callable[..., np.ndarray]) -> Kernel:
    def kernel(ctx: _OpContext) -> np.ndarray:
        x = ctx.tensor("x")
        axis = _axis(ctx.int("axis", -1), x.ndim)
        out = fn(x, axis=axis)
        if ctx.bool("keep_dims", False):
            out = np.expand_dims(out, axis)
        return out

    return kernel


def _k_linear(ctx: _OpContext) -> np.ndarray:
    x, weight = ctx.tensor("x"), ctx.tensor("weight")
    out = _matmul(ctx, x, weight.T)
    bias = ctx.tensor("bias", None)
    return out if bias is None else out + bias


def _k_matmul(ctx: _OpContext) -> np.ndarray:
    x, y = ctx.tensor("x"), ctx.tensor("y")
    if ctx.bool("transpose_x", False) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if ctx.bool("transpose_y", False) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return _matmul(ctx, x, y)


def _k_einsum(ctx: _OpContext) -> np.ndarray:
    return np.einsum(ctx.str("equation"), *ctx.tensors("values"))


def _same_pads(sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int], lower: bool) -> list[int]:
    pads = []
    for d, k, s, dil in zip(sizes, kernel, strides, dilations, strict=True):
        total = max((math.ceil(d / s) - 1) * s + (k - 1) * dil + 1 - d, 0)
        small, large = total // 2, total - total // 2
        pads += [large, small] if lower else [small, large]
    return pads


def _explicit_pads(ctx: _OpContext, sizes: Sequence[int], kernel: Sequence[int],
                   strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """Per-side padding ``[before_0, after_0, ...]`` from ``pad_type`` and ``pad``."""
    n = len(sizes)
    pad_type = ctx.str("pad_type", "valid")
    if pad_type == "valid":
        return [0] * 2 * n
    if pad_type == "custom":
        pad = ctx.ints("pad", None) or [0] * 2 * n
        if len(pad) != 2 * n:
            raise MILExecutionError(f"pad has {len(pad)} values; expected {2 * n}")
        return pad
    if pad_type in ("same", "same_lower"):
        return _same_pads(sizes, kernel, strides, dilations, pad_type == "same_lower")
    raise MILExecutionError(f"pad_type '{pad_type}' is not one of valid, custom, same, "
                            "same_lower")


def _pad_spatial(x: np.ndarray, pads: Sequence[int], value: float) -> np.ndarray:
    if not any(pads):
        return x
    n = len(pads) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(pads[2 * i], pads[2 * i + 1]) for i in range(n)]
    return np.pad(x, widths, mode="constant", constant_values=value)


def _taps(xp: np.ndarray, kernel: Sequence[int], strides: Sequence[int],
          dilations: Sequence[int], out: Sequence[int]) -> Iterator[np.ndarray]:
    """Views of the padded input ``xp`` (spatial dims last), one per kernel tap, row-major."""
    n = len(kernel)
    lead = (slice(None),) * (xp.ndim - n)
    for offsets in itertools.product(*(range(k) for k in kernel)):
        index = tuple(slice(o * dil, o * dil + (size - 1) * s + 1, s)
                      for o, dil, s, size in zip(offsets, dilations, strides, out, strict=True))
        yield xp[lead + index]


def _conv_inputs(ctx: _OpContext
                 ) -> tuple[np.ndarray, np.ndarray, list[int], list[int], list[int], int]:
    """``x``, ``weight``, kernel size, strides, dilations and groups of conv / conv_transpose."""
    x, weight = ctx.tensor("x"), ctx.tensor("weight")
    n = x.ndim - 2
    strides = ctx.ints("strides", None) or [1] * n
    dilations = ctx.ints("dilations", None) or [1] * n
    return x, weight, list(weight.shape[2:]), strides, dilations, ctx.int("groups", 1)


def _k_conv(ctx: _OpContext) -> np.ndarray:
    x, weight, kernel, strides, dilations, groups = _conv_inputs(ctx)
    n = x.ndim - 2
    batch, c_in = x.shape[:2]
    c_out, cin_g = weight.shape[:2]
    if c_in != cin_g * groups or c_out % groups:
        raise MILExecutionError(f"conv: x has {c_in} channels, weight {tuple(weight.shape)}, "
                                f"groups {groups}: channels do not match")
    pads = _explicit_pads(ctx, x.shape[2:], kernel, strides, dilations)
    xp = _pad_spatial(x, pads, 0.0)
    out_sizes = [(xp.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
                 for i in range(n)]
    if min(out_sizes) <= 0:
        raise MILExecutionError(f"conv output would be empty: spatial {out_sizes}")
    taps = math.prod(kernel)
    pixels = math.prod(out_sizes)
    # im2col, channel-major like the weight layout: cols[b, c*taps + t, p].
    cols = np.stack(list(_taps(xp, kernel, strides, dilations, out_sizes)), axis=2)
    cols = cols.reshape(batch, groups, cin_g * taps, pixels)
    w = weight.reshape(groups, c_out // groups, cin_g * taps)
    out = _matmul(ctx, w, cols)  # [B, g, C_out/g, P]
    out = out.reshape([batch, c_out] + out_sizes)
    bias = ctx.tensor("bias", None)
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * n)
    return out


def _pool_geometry(op_type: str, ctx: _OpContext, x_shape: Sequence[int]
                   ) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """kernel, strides, explicit pads, ceil_mode overhang per axis, output sizes.

    The output size is coremltools' (``spatial_dimensions_out_shape``, the size the MIL
    program declares): under ``ceil_mode`` the last window is dropped, as in PyTorch, only
    when there is explicit padding. Without padding Core ML keeps a window that starts past
    the input (``MaxPool2d(1, 3, ceil_mode=True)`` on 6x6: PyTorch 2x2, Core ML 3x3); what it
    computes there is not documented, so that case is refused.
    """
    kernel = ctx.ints("kernel_sizes")
    n = len(kernel)
    strides = ctx.ints("strides", None) or [1] * n
    sizes = list(x_shape[-n:])
    pads = _explicit_pads(ctx, sizes, kernel, strides, [1] * n)
    ceil_mode = ctx.bool("ceil_mode", False)
    out_sizes, overhang = [], []
    for i in range(n):
        size, stride, total = sizes[i], strides[i], pads[2 * i] + pads[2 * i + 1]
        if ceil_mode:
            o = (size + total - kernel[i] + stride - 1) // stride + 1
            if (o - 1) * stride >= size + total / 2 and total > 0:
                o -= 1
        else:
            o = (size + total - kernel[i]) // stride + 1
        if (o - 1) * stride - pads[2 * i] >= size:
            raise _refuse(op_type, f"size {size}, kernel {kernel[i]}, stride {stride}, padding "
                                   f"{pads[2 * i]}+{pads[2 * i + 1]}, ceil_mode={ceil_mode} "
                                   f"give {o} windows, the last wholly past the input (PyTorch "
                                   "drops it; its Core ML value is not documented)")
        out_sizes.append(o)
        overhang.append(max((o - 1) * stride + kernel[i] - size - total, 0))
    return kernel, strides, pads, overhang, out_sizes


def _pool(ctx: _OpContext, mode: str) -> np.ndarray:
    """Max, average or L2 pooling; the ceil_mode overhang holds no values.

    ``avg_pool`` divides by the full kernel unless ``exclude_padding_from_average``, also on
    windows that hang over the input under ``ceil_mode``: that is Core ML's rule (coremltools
    issue 2772, PR 2844), where PyTorch's ``count_include_pad`` counts only explicit padding.
    With ``exclude_padding_from_average`` the divisor is the number of input elements.
    """
    op_type = f"{mode}_pool"
    x = ctx.tensor("x")
    kernel, strides, pads, overhang, out_sizes = _pool_geometry(op_type, ctx, x.shape)
    n = len(kernel)
    full = [p for i in range(n) for p in (pads[2 * i], pads[2 * i + 1] + overhang[i])]
    ones = [1] * n
    if mode == "max":
        xp = _pad_spatial(x, full, -np.inf)
        return np.maximum.reduce(list(_taps(xp, kernel, strides, ones, out_sizes)))
    if mode == "l2":
        xp = _pad_spatial(x * x, full, 0.0)
        return np.sqrt(np.add.reduce(list(_taps(xp, kernel, strides, ones, out_sizes))))
    xp = _pad_spatial(x, full, 0.0)
    total = _accumulate(ctx, _taps(xp, kernel, strides, ones, out_sizes))
    if not ctx.bool("exclude_padding_from_average", False):
        return total / np.float32(math.prod(kernel))
    inside = _pad_spatial(np.ones(x.shape[-n:], dtype=np.float32), full, 0.0)
    count = np.add.reduce(list(_taps(inside, kernel, strides, ones, out_sizes)))
    return total / count


def _channel_affine(ctx: _OpContext, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out * gamma + beta`` with the optional per-channel ``gamma`` / ``beta`` of a norm op."""
    gamma, beta = ctx.tensor("gamma", None), ctx.tensor("beta", None)
    if gamma is not None:
        out = out * _channel_param(x, gamma)
    if beta is not None:
        out = out + _channel_param(x, beta)
    return out


def _k_batch_norm(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    mean = _channel_param(x, ctx.tensor("mean"))
    var = _channel_param(x, ctx.tensor("variance"))
    out = (x - mean) / np.sqrt(var + np.float32(ctx.float("epsilon", 1e-5)))
    return _channel_affine(ctx, x, out)


def _k_instance_norm(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + np.float32(ctx.float("epsilon", 1e-5)))
    return _channel_affine(ctx, x, out)


def _k_layer_norm(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    axes = tuple(sorted(_reduce_axes(ctx, x.ndim)))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + np.float32(ctx.float("epsilon", 1e-5)))
    # gamma / beta have the shape x.shape[axes]; they broadcast over the other axes.
    normalised = [x.shape[d] if d in axes else 1 for d in range(x.ndim)]
    gamma, beta = ctx.tensor("gamma", None), ctx.tensor("beta", None)
    if gamma is not None:
        out = out * gamma.reshape(normalised)
    if beta is not None:
        out = out + beta.reshape(normalised)
    return out


def _k_reshape(ctx: _OpContext) -> np.ndarray:
    """Reshape; each ``0`` in ``shape`` copies an input dim, matched from the right.

    That is the iOS17 rule (a ``0`` with no input dim at its position becomes 1); before
    iOS17 coremltools requires equal ranks whenever ``shape`` holds a 0, where the two rules
    agree.
    """
    x = np.asarray(ctx.raw("x"))
    shape = ctx.ints("shape")
    offset = x.ndim - len(shape)
    return x.reshape([s if s != 0 else (x.shape[i + offset] if i + offset >= 0 else 1)
                      for i, s in enumerate(shape)])


def _k_transpose(ctx: _OpContext) -> np.ndarray:
    return np.transpose(np.asarray(ctx.raw("x")), ctx.ints("perm"))


def _k_expand_dims(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    axes = ctx.ints("axes")
    out_rank = x.ndim + len(axes)
    shape = list(x.shape)
    for a in sorted(_axis(a, out_rank) for a in axes):
        shape.insert(a, 1)
    return x.reshape(shape)


def _k_squeeze(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    axes = ctx.ints("axes", None)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(_axis(a, x.ndim) for a in axes))


def _k_slice_by_index(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    rank = x.ndim
    begin, end = ctx.ints("begin"), ctx.ints("end")
    stride = ctx.ints("stride", None) or [1] * rank
    begin_mask, end_mask = ctx.bools("begin_mask", rank), ctx.bools("end_mask", rank)
    squeeze_mask = ctx.bools("squeeze_mask", rank)
    index: list[slice | int] = []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(begin[i])  # pure index (negative counts from the end)
            continue
        index.append(slice(None if begin_mask[i] else begin[i],
                           None if end_mask[i] else end[i], stride[i]))
    return np.asarray(x[tuple(index)])


def _k_slice_by_size(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    begin, size = ctx.ints("begin"), ctx.ints("size")
    index = []
    for i, (b, s) in enumerate(zip(begin, size, strict=True)):
        b = b + x.shape[i] if b < 0 else b
        index.append(slice(b, None) if s == -1 else slice(b, b + s))
    return x[tuple(index)]


def _k_concat(ctx: _OpContext) -> np.ndarray:
    values = [np.asarray(v) for v in ctx.raw("values")]
    axis = ctx.int("axis")
    if all(v.ndim == 0 for v in values):
        return np.stack(values)
    if ctx.bool("interleave", False):
        axis = _axis(axis, values[0].ndim)
        stacked = np.stack(values, axis=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


def _k_stack(ctx: _OpContext) -> np.ndarray:
    return np.stack([np.asarray(v) for v in ctx.raw("values")], axis=ctx.int("axis"))


def _k_split(ctx: _OpContext) -> list[np.ndarray]:
    x = np.asarray(ctx.raw("x"))
    axis = _axis(ctx.int("axis"), x.ndim)
    sizes = ctx.ints("split_sizes", None)
    if sizes is None:
        num = ctx.int("num_splits")
        if x.shape[axis] % num:
            raise MILExecutionError(f"split: dim {x.shape[axis]} not divisible by {num}")
        sizes = [x.shape[axis] // num] * num
    bounds = np.cumsum(sizes)[:-1]
    return np.split(x, bounds, axis=axis)


def _k_pad(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    pad = ctx.ints("pad")
    n = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    mode = ctx.str("mode", "constant")
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=ctx.float("constant_val", 0.0))
    if mode in ("reflect", "symmetric"):
        return np.pad(x, widths, mode=mode)
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    raise MILExecutionError(f"pad mode '{mode}' is not one of constant, reflect, replicate")


def _k_shape(ctx: _OpContext) -> np.ndarray:
    return np.asarray(np.shape(ctx.raw("x")), dtype=np.int32)


def _k_gather(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    indices = np.asarray(ctx.raw("indices")).astype(np.int64)
    axis = _axis(ctx.int("axis", 0), x.ndim)
    batch_dims = ctx.int("batch_dims", 0)
    if np.any(indices < -x.shape[axis]) or np.any(indices >= x.shape[axis]):
        raise MILExecutionError(f"gather indices out of range for dim {x.shape[axis]}")
    if batch_dims == 0:
        return np.take(x, indices, axis=axis)
    batch_shape = x.shape[:batch_dims]
    xs = x.reshape((-1,) + x.shape[batch_dims:])
    idx = indices.reshape((-1,) + indices.shape[batch_dims:])
    out = np.stack([np.take(a, i, axis=axis - batch_dims) for a, i in zip(xs, idx, strict=True)])
    return out.reshape(batch_shape + out.shape[1:])


def _k_gather_along_axis(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    indices = np.asarray(ctx.raw("indices")).astype(np.int64)
    axis = _axis(ctx.int("axis", 0), x.ndim)
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    return np.take_along_axis(x, indices, axis=axis)


def _k_gather_nd(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    indices = np.asarray(ctx.raw("indices")).astype(np.int64)
    batch_dims = ctx.int("batch_dims", 0)
    batch_shape = x.shape[:batch_dims]
    xs = x.reshape((-1,) + x.shape[batch_dims:])
    idx = indices.reshape((-1,) + indices.shape[batch_dims:])
    outs = []
    for a, i in zip(xs, idx, strict=True):
        outs.append(a[tuple(np.moveaxis(i, -1, 0))])
    return np.stack(outs).reshape(batch_shape + outs[0].shape)


def _k_select(ctx: _OpContext) -> np.ndarray:
    return np.where(np.asarray(ctx.raw("cond")).astype(bool), ctx.tensor("a"), ctx.tensor("b"))


def _k_tile(ctx: _OpContext) -> np.ndarray:
    return np.tile(np.asarray(ctx.raw("x")), ctx.ints("reps"))


def _k_fill(ctx: _OpContext) -> np.ndarray:
    return np.full(ctx.ints("shape"), ctx.tensor("value", np.float32(0.0)))


def _k_fill_like(ctx: _OpContext) -> np.ndarray:
    return np.full(np.shape(ctx.raw("ref_tensor")), ctx.tensor("value", np.float32(0.0)))


def _k_range_1d(ctx: _OpContext) -> np.ndarray:
    return np.arange(ctx.tensor("start"), ctx.tensor("end"), ctx.tensor("step"))


def _k_flatten2d(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    axis = _axis(ctx.int("axis", 1), x.ndim)
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _k_cumsum(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    axis = ctx.int("axis", 0)
    if ctx.bool("reverse", False):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if ctx.bool("exclusive", False):
        out = out - x
    if ctx.bool("reverse", False):
        out = np.flip(out, axis)
    return out


def _k_reverse(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    axes = ctx.ints("axes", None)
    return np.flip(x, axis=None if axes is None else tuple(axes))


def _k_topk(ctx: _OpContext) -> np.ndarray | list[np.ndarray]:
    """The ``k`` largest (or, ``ascending``, smallest) values along ``axis``, and their indices.

    Ties keep the lower index first (a stable sort). ``sort=False`` leaves the order
    unspecified, so it is refused rather than given one order that a consumer might rely on.
    """
    if not ctx.bool("sort", True):
        raise _refuse("topk", "sort=False leaves the order of the k elements unspecified")
    x = np.asarray(ctx.raw("x"))
    axis = _axis(ctx.int("axis", -1), x.ndim)
    k = ctx.int("k", 1)
    if k > x.shape[axis]:
        raise MILExecutionError(f"topk: k={k} exceeds the axis size {x.shape[axis]}")
    keys = x if ctx.bool("ascending", False) else -x.astype(np.float64 if _floating(x)
                                                               else np.int64)
    order = np.argsort(keys, axis=axis, kind="stable")
    indices = np.take(order, np.arange(k), axis=axis)
    values = np.take_along_axis(x, indices, axis=axis)
    if not ctx.bool("return_indices", True):
        return values
    return [values, indices.astype(np.int32)]


def _k_constexpr(ctx: _OpContext) -> Any:
    """A compressed constant (``constexpr_*``): the value coremltools' op definition gives.

    ``materialized_val_inference`` is the decompression coremltools specifies for each
    constexpr op (dequantisation, palette lookup, sparse scatter, and their iOS18
    combinations); Core ML performs it when the model loads. Ops with two outputs (the
    iOS18 ``*_to_sparse`` forms) return both.
    """
    op = ctx.op
    materialise = getattr(op, "materialized_val_inference", None) or op.value_inference
    value = materialise()
    return list(value) if isinstance(value, tuple) else value


def _k_pixel_shuffle(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    r = ctx.int("upscale_factor")
    b, c, h, w = x.shape
    x = x.reshape(b, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // (r * r), h * r, w * r)


# --------------------------------------------------------------------------------------------
# Image resizing, crop, pixel (un)shuffle and transposed convolution
#
# Semantics follow coremltools' MIL op definitions (ops/defs/iOS15..iOS17/image_resizing.py,
# conv.py) and the expected values of coremltools' own op tests, which run against Core ML.
# Where those leave a case open (a mode without a documented formula, or a size for which
# the plausible index rules disagree) the kernel refuses with UnsupportedMILOpError naming the
# op, the mode and the reason; prechecks raise these before anything runs where the op's
# parameters and spatial input sizes are static (see MILExecutor.check_supported).
# --------------------------------------------------------------------------------------------

#: ``resize_bilinear`` / ``resize`` sampling modes with a documented sampling grid.
_SAMPLING_MODES = ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "DEFAULT", "OFFSET_CORNERS",
                   "UNALIGN_CORNERS")


def _refuse(op_type: str, detail: str) -> UnsupportedMILOpError:
    return UnsupportedMILOpError(f"{op_type}: {detail}; the reference executor refuses rather "
                                 "than guess how Core ML computes it.")


def _linear_grid(mode: str, n_in: int, n_out: int) -> np.ndarray:
    """Source coordinates (float64, clamped to ``[0, n_in - 1]``) of ``n_out`` samples.

    The grids of ``resize_bilinear``'s documented sampling modes; ``upsample_bilinear``
    uses ``STRICT_ALIGN_CORNERS`` (``align_corners=True``) or ``UNALIGN_CORNERS``.
    """
    i = np.arange(n_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if n_out == 1:
            grid = np.full(1, (n_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            grid = i * ((n_in - 1) / (n_out - 1))
    elif mode == "DEFAULT":
        spacing = (n_in - n_in / n_out) / (n_out - 1) if n_out > 1 else 0.0
        grid = i * spacing
    elif mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        grid = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        spacing = n_in / n_out
        grid = i * spacing + 0.5 * spacing - 0.5
    else:
        raise MILExecutionError(f"unknown sampling mode '{mode}'")
    return np.minimum(n_in - 1, np.maximum(0.0, grid))


def _lerp_axis(x: np.ndarray, axis: int, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of float32 ``x`` along ``axis`` at source coordinates ``grid``."""
    n_in = x.shape[axis]
    lo = np.floor(grid).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (grid - lo).astype(np.float32).reshape((-1,) + (1,) * (x.ndim - 1 - axis))
    return np.take(x, lo, axis=axis) * (1.0 - frac) + np.take(x, hi, axis=axis) * frac


def _resample_linear(x: np.ndarray, grids: Sequence[np.ndarray]) -> np.ndarray:
    """Separable (bi)linear resampling of the trailing ``len(grids)`` axes (float32)."""
    for k, grid in enumerate(grids):
        x = _lerp_axis(x, x.ndim - len(grids) + k, grid)
    return x


def _take_trailing(x: np.ndarray, indices: Sequence[np.ndarray]) -> np.ndarray:
    """``x`` gathered along its trailing ``len(indices)`` axes (nearest-neighbour resampling)."""
    for k, idx in enumerate(indices):
        x = np.take(x, idx, axis=x.ndim - len(indices) + k)
    return x


def _nearest_indices(op_type: str, axis: str, n_in: int, n_out: int,
                     half_pixel: bool) -> np.ndarray:
    """Source indices ``floor(i * in / out)`` (or ``floor((i + 0.5) * in / out)``), clamped.

    Computed exactly in integers. Where evaluating the same rule in float32 (as a runtime
    would, e.g. torch) lands on another index (``i * in / out`` an exact integer and
    ``fp32(in / out)`` rounded down; rare: 5 of the size pairs up to 32 -> 64) the rounding
    Core ML uses is not documented, so the op is refused.
    """
    i = np.arange(n_out, dtype=np.int64)
    exact = ((2 * i + 1) * n_in) // (2 * n_out) if half_pixel else (i * n_in) // n_out
    ratio = np.float32(n_in / n_out)
    approx = np.floor((i.astype(np.float32) + np.float32(0.5 if half_pixel else 0.0)) * ratio)
    exact = np.minimum(exact, n_in - 1)
    approx = np.minimum(approx.astype(np.int64), n_in - 1)
    if not np.array_equal(exact, approx):
        first = int(np.flatnonzero(exact != approx)[0])
        raise _refuse(op_type, f"{axis} {n_in} -> {n_out}: output {first} reads {exact[first]} "
                      f"in exact arithmetic but {approx[first]} in float32, and Core ML's "
                      "rounding of the nearest-neighbour index is not documented")
    return exact


def _scale_value(ctx: _OpContext, name: str) -> np.generic:
    return np.asarray(ctx.raw(name, 1)).reshape(-1)[0]


def _scaled_size(n_in: int, scale: np.generic) -> int:
    """``floor(n_in * scale)`` as coremltools' type inference computes it (in the scale's dtype)."""
    return int(np.floor(scale * scale.dtype.type(n_in)))


def _static_dims(var: Var, n: int) -> list[int] | None:
    """The trailing ``n`` dims of ``var`` when they are all known at compile time."""
    dims = list(var.shape)[-n:]
    return [int(d) for d in dims] if len(dims) == n and all(map(_is_int_dim, dims)) else None


def _upsampled_sizes(ctx: _OpContext, op: str, sizes: Sequence[int] | None
                     ) -> list[tuple[str, int, int]] | None:
    """``(axis, in, out)`` for height and width from the op's scale factors (None: unknown)."""
    scales = [_scale_value(ctx, "scale_factor_height"), _scale_value(ctx, "scale_factor_width")]
    if sizes is None:
        return None
    sized = []
    for axis, n_in, scale in zip(("height", "width"), sizes, scales, strict=True):
        n_out = _scaled_size(n_in, scale)
        if n_out <= 0:
            raise MILExecutionError(f"{op}: scale {scale} maps {axis} {n_in} to {n_out}")
        sized.append((axis, n_in, n_out))
    return sized


def _upsample_nearest_indices(ctx: _OpContext, sizes: Sequence[int] | None
                              ) -> list[np.ndarray] | None:
    """Source rows/cols of ``upsample_nearest_neighbor`` for input sizes ``(H, W)``.

    Output size ``floor(in * scale)``; output ``i`` reads ``floor(i * in / out)``. Integer
    scales repeat every element ``scale`` times. For fractional scales (the torch converter
    writes ``(out + 1e-4) / in`` for a ``size`` that is no multiple of the input) the rule is
    the one coremltools' op test pins on the CPU (width 3 at scale 1.12 stays the identity,
    which ``floor(i / scale)`` would not give; 3 at 0.67 reads 0, 1, which rules out
    half-pixel centers); that test is marked failing on the GPU (rdar://97398448), so a GPU
    may pick other rows for fractional scales.
    """
    sized = _upsampled_sizes(ctx, "upsample_nearest_neighbor", sizes)
    if sized is None:
        return None
    return [_nearest_indices("upsample_nearest_neighbor", axis, n_in, n_out, False)
            for axis, n_in, n_out in sized]


def _k_upsample_nearest_neighbor(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    return _take_trailing(x, _upsample_nearest_indices(ctx, x.shape[-2:]))


def _upsample_bilinear_mode(ctx: _OpContext) -> str:
    """The ``resize_bilinear`` sampling grid that ``upsample_bilinear`` uses.

    ``align_corners=True`` is ``STRICT_ALIGN_CORNERS`` and ``align_corners=False`` is
    ``UNALIGN_CORNERS`` (TF half-pixel centers), with the spacing recomputed from the output
    size (``in / out``), as the iOS15 definition documents. iOS16 adds ``half_pixel_centers``
    (default ``not align_corners``); its other two combinations have no documented grid.
    """
    align = ctx.bool("align_corners", True)
    half_pixel = ctx.bool("half_pixel_centers", not align)
    if half_pixel == align:
        raise _refuse("upsample_bilinear", f"align_corners={align} with half_pixel_centers="
                      f"{half_pixel} has no documented sampling grid")
    return "STRICT_ALIGN_CORNERS" if align else "UNALIGN_CORNERS"


def _upsample_bilinear_grids(ctx: _OpContext, sizes: Sequence[int] | None
                             ) -> list[np.ndarray] | None:
    mode = _upsample_bilinear_mode(ctx)
    sized = _upsampled_sizes(ctx, "upsample_bilinear", sizes)
    if sized is None:
        return None
    grids = []
    for axis, n_in, n_out in sized:
        if mode == "STRICT_ALIGN_CORNERS" and n_out == 1 and n_in > 1:
            raise _refuse("upsample_bilinear", f"align_corners=True with output {axis} 1 "
                          "(spacing (in-1)/(out-1) is undefined)")
        grids.append(_linear_grid(mode, n_in, n_out))
    return grids


def _k_upsample_bilinear(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    return _resample_linear(x, _upsample_bilinear_grids(ctx, x.shape[-2:]))


def _resize_bilinear_grids(ctx: _OpContext, sizes: Sequence[int] | None
                           ) -> list[np.ndarray] | None:
    mode = ctx.str("sampling_mode", "DEFAULT")
    if mode not in _SAMPLING_MODES:
        raise _refuse("resize_bilinear", f"sampling_mode '{mode}' is not documented")
    targets = [ctx.int("target_size_height", 1), ctx.int("target_size_width", 1)]
    if sizes is None:
        return None
    return [_linear_grid(mode, n_in, n_out) for n_in, n_out in zip(sizes, targets, strict=True)]


def _k_resize_bilinear(ctx: _OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    return _resample_linear(x, _resize_bilinear_grids(ctx, x.shape[-2:]))


def _resize_nearest_indices(op_type: str, sizes: Sequence[int],
                            targets: Sequence[int]) -> list[np.ndarray]:
    axes = ("height", "width")[-len(sizes):] if len(sizes) <= 2 else ("dim",) * len(sizes)
    return [_nearest_indices(op_type, axis, n_in, n_out, True)
            for axis, n_in, n_out in zip(axes, sizes, targets, strict=True)]


def _k_resize_nearest_neighbor(ctx: _OpContext) -> np.ndarray:
    """Nearest neighbour to a target size: ``src = floor((i + 0.5) * in / out)``.

    The half-pixel rule: coremltools lowers TF ``ResizeNearestNeighbor(half_pixel_centers=True)``
    to this op (and, for dynamic sizes, to iOS17 ``resize``, documented as its superset), and
    ``resize``'s NEAREST_NEIGHBOR test (2 -> 3 rows read 0, 1, 1) confirms it.
    """
    x = np.asarray(ctx.raw("x"))
    targets = [ctx.int("target_size_height"), ctx.int("target_size_width")]
    return _take_trailing(x, _resize_nearest_indices("resize_nearest_neighbor", x.shape[-2:],
                                                     targets))


def _resize_plan(ctx: _OpContext, x_shape: Sequence[Any] | None
                 ) -> tuple[str, str, list[int]] | None:
    """The interpolation mode, sampling mode and resized-dim output sizes of iOS17 ``resize``.

    Only the modes are checked when ``x_shape`` is not known yet (``None``).
    """
    interp = ctx.str("interpolation_mode", "LINEAR")
    mode = ctx.str("sampling_mode", "DEFAULT")
    if interp not in ("LINEAR", "NEAREST_NEIGHBOR"):
        raise _refuse("resize", f"interpolation_mode '{interp}' is not documented")
    if mode not in _SAMPLING_MODES:
        raise _refuse("resize", f"sampling_mode '{mode}' is not documented")
    if interp == "NEAREST_NEIGHBOR" and mode != "DEFAULT":
        raise _refuse("resize", f"NEAREST_NEIGHBOR with sampling_mode '{mode}' has no "
                      "documented index rule (only DEFAULT, the half-pixel rule, is pinned "
                      "by Core ML's tests)")
    k = ctx.int("resized_dims")
    if k > 2:
        raise _refuse("resize", f"resized_dims={k} (only 1-D and 2-D resizing is documented)")
    if x_shape is None:
        return None
    shape = ctx.ints("shape")
    if not k <= len(shape) <= len(x_shape):
        raise MILExecutionError(f"resize: shape {shape} does not fit resized_dims {k} and "
                                f"x of rank {len(x_shape)}")
    sizes = list(x_shape[len(x_shape) - k:])
    targets = [s if s != 0 else d for s, d in zip(shape[len(shape) - k:], sizes, strict=True)]
    return interp, mode, targets


def _k_resize(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    interp, mode, targets = _resize_plan(ctx, x.shape)
    k = len(targets)
    sizes = x.shape[x.ndim - k:]
    if interp == "NEAREST_NEIGHBOR":
        return _take_trailing(x, _resize_nearest_indices("resize", sizes, targets))
    if not _floating(x):
        raise _refuse("resize", f"LINEAR interpolation of {x.dtype} input (rounding of the "
                      "interpolated integers is not documented)")
    grids = [_linear_grid(mode, n_in, n_out) for n_in, n_out in zip(sizes, targets, strict=True)]
    return _resample_linear(x.astype(np.float32), grids)


def _k_crop(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    (top, bottom), (left, right) = ctx.ints("crop_height"), ctx.ints("crop_width")
    h, w = x.shape[-2:]
    if top + bottom >= h or left + right >= w or min(top, bottom, left, right) < 0:
        raise MILExecutionError(f"crop {[top, bottom]}x{[left, right]} does not fit {h}x{w}")
    return x[..., top:h - bottom, left:w - right]


def _k_pixel_unshuffle(ctx: _OpContext) -> np.ndarray:
    """Inverse of pixel_shuffle (torch ``PixelUnshuffle``).

    Output channel ``c*f*f + i*f + j`` holds pixel ``(h*f + i, w*f + j)`` of channel ``c``.
    """
    x = np.asarray(ctx.raw("x"))
    f = ctx.int("downscale_factor")
    b, c, h, w = x.shape
    if h % f or w % f:
        raise MILExecutionError(f"pixel_unshuffle: {h}x{w} not divisible by {f}")
    x = x.reshape(b, c, h // f, f, w // f, f).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * f * f, h // f, w // f)


def _conv_transpose_pads(ctx: _OpContext, in_sizes: Sequence[int], kernel: Sequence[int],
                         strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """Per-side cropping ``[before_0, after_0, ...]`` of the full transposed convolution.

    The full output has ``(in - 1) * stride + (k - 1) * dilation + 1`` elements per dim.
    ``valid`` keeps it, ``custom`` crops ``pad``; ``same`` (output ``in * stride``, or
    ``output_shape``) crops the TF way, the odd element after. For ``valid``/``custom`` an
    ``output_shape`` must equal the computed size (where the extra elements would go is not
    documented), and ``same`` must not need an output larger than the full one.
    """
    n = len(in_sizes)
    full = [(i - 1) * s + (k - 1) * d + 1
            for i, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True)]
    pad_type = ctx.str("pad_type", "valid")
    out_shape = ctx.ints("output_shape", None)
    wanted = None if out_shape is None else out_shape[2:]
    if pad_type in ("valid", "custom"):
        pads = [0] * 2 * n
        if pad_type == "custom":
            pads = ctx.ints("pad", None) or pads
            if len(pads) != 2 * n:
                raise MILExecutionError(f"pad has {len(pads)} values; expected {2 * n}")
        got = [f - pads[2 * i] - pads[2 * i + 1] for i, f in enumerate(full)]
        if wanted is not None and list(wanted) != got:
            raise _refuse("conv_transpose", f"pad_type '{pad_type}' with output_shape "
                          f"{out_shape} differing from the computed spatial size {got}")
        return pads
    if pad_type == "same":
        target = list(wanted) if wanted is not None else [
            i * s for i, s in zip(in_sizes, strides, strict=True)]
        pads = []
        for f, t in zip(full, target, strict=True):
            total = f - t
            if total < 0:
                raise _refuse("conv_transpose", f"pad_type 'same' with an output ({target}) "
                              f"larger than the full transposed convolution ({full})")
            pads += [total // 2, total - total // 2]
        return pads
    raise _refuse("conv_transpose", f"pad_type '{pad_type}' is not documented")


def _k_conv_transpose(ctx: _OpContext) -> np.ndarray:
    """Transposed convolution, accumulated in float32 like ``conv``.

    Input pixel ``p`` adds ``x[p] * w[tap]`` to output ``p * stride + tap * dilation`` of the
    full result, which is then cropped (see :func:`_conv_transpose_pads`).
    """
    x, weight, kernel, strides, dilations, groups = _conv_inputs(ctx)
    n = x.ndim - 2
    batch, c_in = x.shape[:2]
    in_sizes = list(x.shape[2:])
    cout_g = weight.shape[1]
    if weight.shape[0] != c_in or c_in % groups:
        raise MILExecutionError(f"conv_transpose: x has {c_in} channels, weight "
                                f"{tuple(weight.shape)}, groups {groups}: channels do not match")
    pads = _conv_transpose_pads(ctx, in_sizes, kernel, strides, dilations)
    full = [(i - 1) * s + (k - 1) * d + 1
            for i, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True)]
    cin_g = c_in // groups
    xg = x.reshape(batch, groups, cin_g, -1)
    wg = np.moveaxis(weight.reshape(groups, cin_g, cout_g, -1), 2, 1)  # [g, C_out/g, C_in/g, T]
    out = np.zeros([batch, groups, cout_g] + full, dtype=np.float32)
    lead = (slice(None),) * 3
    for t, offsets in enumerate(itertools.product(*(range(k) for k in kernel))):
        contrib = _matmul(ctx, wg[..., t], xg).reshape([batch, groups, cout_g] + in_sizes)
        index = tuple(slice(o * d, o * d + (size - 1) * s + 1, s)
                      for o, d, s, size in zip(offsets, dilations, strides, in_sizes, strict=True))
        out[lead + index] += contrib
        if ctx.per_term:
            out[lead + index] = _round16(out[lead + index])
    out = out.reshape([batch, groups * cout_g] + full)
    crop = tuple(slice(pads[2 * i], full[i] - pads[2 * i + 1]) for i in range(n))
    out = out[(slice(None), slice(None)) + crop]
    if min(out.shape[2:], default=1) <= 0:
        raise MILExecutionError(f"conv_transpose output would be empty: {out.shape}")
    bias = ctx.tensor("bias", None)
    if bias is not None:
        out = out + bias.reshape((1, -1) + (1,) * n)
    return out


# -- prechecks: refusals found from the op's constant parameters, before anything runs -----


class _NotStatic(Exception):
    """A precheck needs a value that is only known at run time; the kernel checks it then."""


def _static_lookup(var: Var) -> Any:
    if var.val is None:
        raise _NotStatic(var.name)
    return _as_value(var.val)


def _precheck_conv_transpose(op: Operation, ctx: _OpContext) -> None:
    in_sizes = _static_dims(op.inputs["x"], op.inputs["x"].rank - 2)
    kernel = _static_dims(op.inputs["weight"], op.inputs["weight"].rank - 2)
    if in_sizes is not None and kernel is not None:
        n = len(in_sizes)
        _conv_transpose_pads(ctx, in_sizes, kernel, ctx.ints("strides", None) or [1] * n,
                             ctx.ints("dilations", None) or [1] * n)
    else:
        pad_type = ctx.str("pad_type", "valid")
        if pad_type not in ("valid", "custom", "same"):
            raise _refuse("conv_transpose", f"pad_type '{pad_type}' is not documented")


def _precheck_pool(op: Operation, ctx: _OpContext) -> None:
    n = len(ctx.ints("kernel_sizes"))
    sizes = _static_dims(op.inputs["x"], n)
    if sizes is not None:
        _pool_geometry(op.op_type, ctx, sizes)


def _precheck_resize_nearest_neighbor(op: Operation, ctx: _OpContext) -> None:
    sizes = _static_dims(op.inputs["x"], 2)
    if sizes is not None:
        _resize_nearest_indices("resize_nearest_neighbor", sizes,
                                [ctx.int("target_size_height"), ctx.int("target_size_width")])


def _precheck_resize(op: Operation, ctx: _OpContext) -> None:
    x_shape = list(op.inputs["x"].shape)
    _resize_plan(ctx, None)  # the modes
    if all(map(_is_int_dim, x_shape)):
        _resize_plan(ctx, x_shape)


_PRECHECKS: dict[str, Callable[[Operation, _OpContext], Any]] = {
    "upsample_nearest_neighbor":
        lambda op, ctx: _upsample_nearest_indices(ctx, _static_dims(op.inputs["x"], 2)),
    "upsample_bilinear":
        lambda op, ctx: _upsample_bilinear_grids(ctx, _static_dims(op.inputs["x"], 2)),
    "resize_bilinear": lambda op, ctx: _resize_bilinear_grids(ctx, None),
    "resize_nearest_neighbor": _precheck_resize_nearest_neighbor,
    "resize": _precheck_resize,
    "conv_transpose": _precheck_conv_transpose,
    **{pool: _precheck_pool for pool in ("max_pool", "avg_pool", "l2_pool")},
}


def _precheck(op: Operation) -> str | None:
    """Why the executor refuses ``op`` (from its static parameters), or ``None``."""
    check = _PRECHECKS.get(op.op_type)
    if check is None:
        return None
    try:
        check(op, _OpContext(op, _static_lookup))
    except UnsupportedMILOpError as exc:
        return str(exc)
    except _NotStatic:
        return None  # decided when the op runs
    return None


def _k_band_part(ctx: _OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    lower, upper = ctx.int("lower", -1), ctx.int("upper", -1)
    rows, cols = np.indices(x.shape[-2:])
    keep = np.ones(x.shape[-2:], dtype=bool)
    if lower >= 0:
        keep &= (rows - cols) <= lower
    if upper >= 0:
        keep &= (cols - rows) <= upper
    return np.where(keep, x, np.zeros_like(x))


def _logical(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Kernel:
    def kernel(ctx: _OpContext) -> np.ndarray:
        return fn(np.asarray(ctx.raw("x")).astype(bool), np.asarray(ctx.raw("y")).astype(bool))

    return kernel


_KERNELS: dict[str, Kernel] = {
    # values and types
    "const": _k_const,
    "cast": _k_cast,
    "identity": _k_identity,
    # element-wise binary (NumPy broadcasting, as MIL)
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(_real_div),
    "floor_div": _binary(np.floor_divide),
    "mod": _binary(np.mod),
    "pow": _binary(np.power),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "equal": _binary(np.equal),
    "not_equal": _binary(np.not_equal),
    "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal),
    "less": _binary(np.less),
    "less_equal": _binary(np.less_equal),
    "logical_and": _logical(np.logical_and),
    "logical_or": _logical(np.logical_or),
    "logical_xor": _logical(np.logical_xor),
    "logical_not": lambda ctx: np.logical_not(np.asarray(ctx.raw("x")).astype(bool)),
    # element-wise unary and activations
    "relu": _unary(lambda x: np.maximum(x, np.zeros((), x.dtype))),
    "relu6": _unary(lambda x: np.clip(x, 0.0, 6.0).astype(x.dtype)),
    "sigmoid": _unary(_sigmoid),
    "silu": _unary(lambda x: x * _sigmoid(x)),
    "tanh": _unary(np.tanh),
    "softplus": _unary(lambda x: np.logaddexp(np.zeros((), x.dtype), x)),
    "softsign": _unary(lambda x: x / (1.0 + np.abs(x))),
    "gelu": _k_gelu,
    "clip": _k_clip,
    "threshold": _k_threshold,
    "leaky_relu": _k_leaky_relu,
    "elu": _k_elu,
    "prelu": _k_prelu,
    "clamped_relu": _k_clamped_relu,
    "thresholded_relu": _k_thresholded_relu,
    "linear_activation": _k_linear_activation,
    "sigmoid_hard": _k_sigmoid_hard,
    "scaled_tanh": _k_scaled_tanh,
    "softplus_parametric": _k_softplus_parametric,
    "abs": _unary(np.abs),
    "sign": _unary(np.sign),
    "square": _unary(np.square),
    "sqrt": _unary(np.sqrt),
    "exp": _unary(np.exp),
    "exp2": _unary(np.exp2),
    "floor": _unary(np.floor),
    "ceil": _unary(np.ceil),
    "round": _unary(np.round),
    "sin": _unary(np.sin),
    "cos": _unary(np.cos),
    "tan": _unary(np.tan),
    "asin": _unary(np.arcsin),
    "acos": _unary(np.arccos),
    "atan": _unary(np.arctan),
    "sinh": _unary(np.sinh),
    "cosh": _unary(np.cosh),
    "atanh": _unary(np.arctanh),
    "erf": _unary(_erf_array),
    "log": _eps_unary(lambda x, eps: np.log(x + eps), 1e-45),
    "rsqrt": _eps_unary(lambda x, eps: 1.0 / np.sqrt(x + eps), 1e-12),
    "inverse": _eps_unary(lambda x, eps: 1.0 / (x + eps), 1e-4),
    "softmax": _k_softmax,
    # reductions (accumulated in float32)
    "reduce_mean": _reduction(mean=True),
    "reduce_sum": _reduction(),
    "reduce_max": _reduction(lambda x, a: np.max(x, axis=a)),
    "reduce_min": _reduction(lambda x, a: np.min(x, axis=a)),
    "reduce_prod": _reduction(lambda x, a: np.prod(x, axis=a)),
    "reduce_sum_square": _reduction(lambda x, a: np.sum(x * x, axis=a)),
    "reduce_l1_norm": _reduction(lambda x, a: np.sum(np.abs(x), axis=a)),
    "reduce_l2_norm": _reduction(lambda x, a: np.sqrt(np.sum(x * x, axis=a))),
    "reduce_log_sum": _reduction(lambda x, a: np.log(np.sum(x, axis=a))),
    "reduce_log_sum_exp": _reduction(
        lambda x, a: np.log(np.sum(np.exp(x - np.max(x, axis=a, keepdims=True)), axis=a))
        + np.max(x, axis=a)),
    "reduce_argmax": _reduce_arg(np.argmax),
    "reduce_argmin": _reduce_arg(np.argmin),
    # linear algebra and convolution
    "linear": _k_linear,
    "matmul": _k_matmul,
    "einsum": _k_einsum,
    "conv": _k_conv,
    "max_pool": lambda ctx: _pool(ctx, "max"),
    "avg_pool": lambda ctx: _pool(ctx, "avg"),
    "l2_pool": lambda ctx: _pool(ctx, "l2"),
    # normalization
    "batch_norm": _k_batch_norm,
    "instance_norm": _k_instance_norm,
    "layer_norm": _k_layer_norm,
    # shape and data movement
    "reshape": _k_reshape,
    "transpose": _k_transpose,
    "expand_dims": _k_expand_dims,
    "squeeze": _k_squeeze,
    "flatten2d": _k_flatten2d,
    "slice_by_index": _k_slice_by_index,
    "slice_by_size": _k_slice_by_size,
    "concat": _k_concat,
    "stack": _k_stack,
    "split": _k_split,
    "pad": _k_pad,
    "shape": _k_shape,
    "gather": _k_gather,
    "gather_along_axis": _k_gather_along_axis,
    "gather_nd": _k_gather_nd,
    "select": _k_select,
    "tile": _k_tile,
    "fill": _k_fill,
    "fill_like": _k_fill_like,
    "range_1d": _k_range_1d,
    "cumsum": _k_cumsum,
    "reverse": _k_reverse,
    "pixel_shuffle": _k_pixel_shuffle,
    "pixel_unshuffle": _k_pixel_unshuffle,
    "topk": _k_topk,
    "band_part": _k_band_part,
    # image resizing and upsampling (detector necks)
    "upsample_nearest_neighbor": _k_upsample_nearest_neighbor,
    "upsample_bilinear": _k_upsample_bilinear,
    "resize_nearest_neighbor": _k_resize_nearest_neighbor,
    "resize_bilinear": _k_resize_bilinear,
    "resize": _k_resize,
    "crop": _k_crop,
    "conv_transpose": _k_conv_transpose,
}

# compressed constants (coremltools.optimize, iOS16 and iOS18 forms)
_KERNELS.update({name: _k_constexpr for name in (
    "constexpr_affine_dequantize", "constexpr_cast",
    "constexpr_lut_to_dense", "constexpr_sparse_to_dense", "constexpr_blockwise_shift_scale",
    "constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale")})

#: Op types the executor has a kernel for.
SUPPORTED_OPS: frozenset[str] = frozenset(_KERNELS)
