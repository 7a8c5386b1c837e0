"""int8 kernel banks: the ODConv bank stored int8 per output channel, dequantized at run time.

An ODConv layer's weight is ``W(x) = sum_i a_i(x) * alpha_s(x) * W_i`` with the kernel
attention ``a`` on the simplex and the spatial attention in (0, 1), so ``|W(x)| <=
max_i |W_i|`` elementwise: a scale per output channel taken from the stored bank bounds every
weight the layer can compute, and quantizing the bank needs no calibration data. A BatchNorm
folded into the bank scales output channels and keeps the bound.

The scheme (``int8w``, weight-only): each deploy layer's bank, in the canonical layout
``[K, C_out, C_in/g, k, k]``, becomes ``q = round(W / s)`` with ``s[o] = max |W[:, o]| / 127``
(symmetric, zero point 0, ``q`` in [-127, 127]); the layer computes ``q * s`` and then its
form's layout at run time, in float32 as before. The quantized model run in PyTorch is the
reference an int8w artifact must match at the float32 rule: every runtime computes ``q * s``
with the one rounding PyTorch does. How far it is from the float32 model is the quantization
drift, reported apart (:mod:`odconv_deploy.validation.drift`).

What the exporters make of the one dequantization (:meth:`Int8Weight.forward`):
- ONNX: ``DequantizeLinear`` on the int8 initializer (per axis). Neither onnxsim nor ONNX
  Runtime's optimiser folds it, so ``.onnx``, ``.sim.onnx`` and ``.ort`` keep int8 banks.
- ExecuTorch: an int8 constant, a cast and a multiply (the bank stays int8 in the ``.pte``).
- Core ML: ``quantize_per_channel`` of the constant, which coremltools turns into
  ``constexpr_affine_dequantize`` (iOS17 and later), decompressed by Core ML at load.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from odconv_deploy.errors import ODConvDeployError

#: The precisions an export can take: what the artifact stores and computes in. Which format
#: takes which is in the format table (:data:`export.formats.FORMATS`).
PRECISIONS: dict[str, str] = {
    "fp32": "float32 weights and compute (Core ML: --coreml-precision, fp16 by default)",
    "fp16": "float16 weights and compute",
    "int8w": "ODConv kernel banks stored int8 per output channel, computed in float",
    "int8": "int8w, plus the static convs and linears int8 in weights and activations "
            "(QDQ, calibrated)",
    "lut6w": "ODConv kernel banks palettized: 64 values per bank (k-means), a 6-bit index "
             "per weight, computed in float (Core ML)",
}
#: Bits of a palettized bank's indices (``lut6w``): a lookup table of 2**6 values per bank.
#: (4 bits moved od_mobilenetv2_digits' top-1 by -0.84 points, 6 bits by -0.28.)
LUT_BITS = 6
#: The most weights of one bank the palettizer's k-means is fitted on.
KMEANS_SAMPLE = 2 ** 17
#: The precisions whose ODConv kernel banks are stored int8.
INT8_BANK_PRECISIONS = ("int8w", "int8")
#: The weight storage an int8 artifact records (``weights`` in its metadata and options): its
#: banks int8w, its static convs and linears int8 with int8 activations.
INT8_STORAGE = "int8"
#: int8 range of the symmetric scheme (-128 unused, so ``-q`` is always representable).
INT8_LIMIT = 127
#: The output-channel axis of the canonical bank layout ``[K, C_out, C_in/g, k, k]``.
BANK_CHANNEL_AXIS = 1


def stores_int8_banks(precision: str) -> bool:
    """Whether ``precision`` stores the ODConv kernel banks int8 (int8w and int8)."""
    return precision in INT8_BANK_PRECISIONS


def check_precision_name(precision: str) -> None:
    """Refuse an unknown precision, listing the known ones.

    Raises:
        ODConvDeployError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ODConvDeployError(
            f"Unknown precision {precision!r}. Note: choose one of "
            + "; ".join(f"{name} ({what})" for name, what in PRECISIONS.items()) + ".")


class _DequantizeLinear(torch.autograd.Function):
    """``q * scale`` along ``axis``, exported to ONNX as one ``DequantizeLinear`` node."""

    @staticmethod
    def forward(ctx: object, q: torch.Tensor, scale: torch.Tensor, axis: int  # noqa: D102
                ) -> torch.Tensor:
        return _dequantize(q, scale, axis)

    @staticmethod
    def symbolic(g: object, q: object, scale: object, axis: int) -> object:  # noqa: D102
        return g.op("DequantizeLinear", q, scale, axis_i=axis)


def _channel_shape(rank: int, axis: int) -> list[int]:
    shape = [1] * rank
    shape[axis] = -1
    return shape


def _dequantize(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    return q.to(scale.dtype) * scale.reshape(_channel_shape(q.dim(), axis))


def channel_scales(weight: torch.Tensor, axis: int = BANK_CHANNEL_AXIS) -> torch.Tensor:
    """Symmetric int8 scales per output channel (``axis``); 1 for an all-zero channel."""
    dims = [d for d in range(weight.dim()) if d != axis]
    peak = weight.detach().abs().amax(dim=dims)
    return torch.where(peak > 0, peak / INT8_LIMIT, torch.ones_like(peak))


class Int8Weight(nn.Module):
    """A weight stored int8 with a scale per output channel (in the weight's dtype).

    Args:
        weight: The float weight: an ODConv bank ``[K, C_out, C_in/g, k, k]`` (output channels
            on axis 1) or a conv weight ``[C_out, C_in/g, k, k]`` (axis 0).
        axis: The output-channel axis.
    """

    def __init__(self, weight: torch.Tensor, axis: int) -> None:
        super().__init__()
        self.axis = axis
        scale = channel_scales(weight, axis)
        q = torch.round(weight.detach() / scale.reshape(_channel_shape(weight.dim(), axis)))
        self.register_buffer("q", q.clamp(-INT8_LIMIT, INT8_LIMIT).to(torch.int8))
        self.register_buffer("scale", scale)
        # quantize_per_channel (the Core ML route) takes integer zero points.
        self.register_buffer("zero_point", torch.zeros(scale.shape, dtype=torch.int64),
                             persistent=False)

    def forward(self) -> torch.Tensor:
        """The dequantized weight ``q * s`` (in ``scale``'s dtype)."""
        if torch.onnx.is_in_onnx_export():
            return _DequantizeLinear.apply(self.q, self.scale, self.axis)
        weight = _dequantize(self.q, self.scale, self.axis)
        if torch.jit.is_tracing():
            # The TorchScript trace coremltools converts: a quantize of a constant becomes a
            # constexpr_affine_dequantize of ``q`` (its round(q * s / s) gives back q exactly).
            weight = torch.quantize_per_channel(weight, self.scale, self.zero_point, self.axis,
                                                torch.qint8).dequantize()
        return weight

    def extra_repr(self) -> str:  # noqa: D102
        return f"shape={tuple(self.q.shape)}, int8 per output channel (axis {self.axis})"


class Int8Conv2d(nn.Module):
    """A static conv whose weight is stored int8 per output channel (a twin's ``int8w``).

    Args:
        conv: The float conv (zero padding), whose weight and bias it takes.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ODConvDeployError(f"Int8Conv2d takes numeric zero padding; got padding="
                                    f"{conv.padding!r}, padding_mode={conv.padding_mode!r}.")
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight_int8 = Int8Weight(conv.weight, axis=0)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return nn.functional.conv2d(x, self.weight_int8(), self.bias, self.stride,
                                    self.padding, self.dilation, self.groups)


def palettize_kernel_banks(model: nn.Module, nbits: int = LUT_BITS) -> nn.Module:
    """A copy of a deploy-form model whose ODConv banks each take at most ``2**nbits`` values.

    Each bank's values are clustered by k-means (scikit-learn's, seeded: what coremltools'
    palettizer runs) and replaced by their centroids, so the float bank is exactly what a
    lookup table of ``2**nbits`` entries and an ``nbits`` index per weight store: the Core ML
    exporter then palettizes it losslessly (``constexpr_lut_to_dense``), and this model is the
    reference the artifact must match at the float rules. No calibration: weights only.

    Raises:
        ODConvDeployError: The model has no ODConv deploy layer.
    """
    from odconv_deploy.errors import require_backend
    from odconv_deploy.layers.deploy import ODConv2dDeploy

    cluster = require_backend("sklearn.cluster", extra="train", purpose="Palettizing banks")
    palettized = copy.deepcopy(model)
    layers = [m for m in palettized.modules() if isinstance(m, ODConv2dDeploy)]
    if not layers:
        raise ODConvDeployError(
            f"{type(model).__name__} has no ODConv deploy layer, so lut6w has no kernel bank "
            "to palettize. Note: export this model in fp32.")
    for layer in layers:
        if layer.weight_int8 is not None:
            raise ODConvDeployError("A bank already stored int8 cannot be palettized. Note: "
                                    "palettize the float deploy model.")
        canonical = layer.canonical_weight()
        values = canonical.reshape(-1, 1).double().numpy()
        clusters = min(2 ** nbits, len(np.unique(values)))
        # Centroids from a seeded sample of a large bank (seconds, not minutes, for
        # od_resnet18's 9.4M-weight layers); every weight then takes its nearest centroid.
        sample = (values if len(values) <= KMEANS_SAMPLE else values[
            np.random.default_rng(0).choice(len(values), KMEANS_SAMPLE, replace=False)])
        kmeans = cluster.KMeans(clusters, init="k-means++", tol=1e-2, n_init=1,
                                random_state=0).fit(sample)
        centroids = torch.from_numpy(kmeans.cluster_centers_[:, 0]).to(canonical.dtype)
        labels = kmeans.predict(values)
        lut_values = centroids[torch.from_numpy(labels)].reshape(canonical.shape)
        with torch.no_grad():
            layer.weight.copy_(layer.layout_weight(lut_values))
        layer.bank_lut_bits = nbits
    return palettized.eval()


def has_palettized_banks(model: nn.Module) -> bool:
    """Whether the ODConv banks of ``model`` were palettized (a ``lut6w`` model)."""
    return any(getattr(m, "bank_lut_bits", None) for m in model.modules())


def has_int8_banks(model: nn.Module) -> bool:
    """Whether any layer of ``model`` stores its weight int8 (an ``int8w`` model)."""
    return any(isinstance(m, Int8Weight) for m in model.modules())


def weight_storage(model: nn.Module) -> str:
    """What an artifact of ``model`` stores its weights as: ``int8w``, ``lut6w`` or ``float``."""
    if has_int8_banks(model):
        return "int8w"
    return "lut6w" if has_palettized_banks(model) else "float"


def stored_weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters plus the int8 weights and their scales."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    int8 = sum(m.q.numel() + m.scale.numel() * m.scale.element_size()
               for m in model.modules() if isinstance(m, Int8Weight))
    return params + int8


def quantize_conv_weights(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of ``model`` whose convs at ``names`` store their weights int8 (Int8Conv2d).

    What makes a static twin ``int8w`` like its ODConv model: the convs that stand in for the
    ODConv layers are stored int8 per output channel, the rest stays float.

    Raises:
        ODConvDeployError: A name that is not an ``nn.Conv2d`` of the model.
    """
    quantized = copy.deepcopy(model)
    modules = dict(quantized.named_modules())
    for name in names:
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            raise ODConvDeployError(
                f"{name!r} is not a Conv2d of {type(model).__name__} (found "
                f"{type(conv).__name__ if conv is not None else 'nothing'}). Note: pass the "
                "names of the convs that stand in for the ODConv layers.")
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else quantized, attr, Int8Conv2d(conv))
    return quantized.eval()


def quantize_kernel_banks(model: nn.Module) -> nn.Module:
    """A copy of a deploy-form model whose ODConv kernel banks are stored int8 (``int8w``).

    Everything else (attention, static convs, the classifier) stays float32.

    Raises:
        ODConvDeployError: The model has no ODConv deploy layer, or one whose form cannot
            take an int8 bank (``ort_nchwc``, whose NCHWc rewrite reads a float bank).
    """
    from odconv_deploy.layers.deploy import ODConv2dDeploy
    from odconv_deploy.layers.ort_nchwc import OrtNchwcODConv2d

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ODConv2dDeploy)]
    if not layers:
        raise ODConvDeployError(
            f"{type(model).__name__} has no ODConv deploy layer, so int8w has no kernel bank "
            "to store int8. Note: int8w quantizes ODConv banks only; export this model in "
            "fp32.")
    blocked = [n for n, m in layers if isinstance(m, OrtNchwcODConv2d)]
    if blocked:
        raise ODConvDeployError(
            f"int8w cannot take ort_nchwc layers ({', '.join(blocked[:3])}"
            f"{', ...' if len(blocked) > 3 else ''}): their NCHWc rewrite reads a float bank. "
            "Note: export with --onnx-target onnx (or a strategy other than ort_nchwc).")
    quantized = copy.deepcopy(model)
    for module in quantized.modules():
        if isinstance(module, ODConv2dDeploy):
            module.store_bank_int8()
    return quantized.eval()
