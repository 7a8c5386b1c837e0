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

What the exporters make of the one dequantization (:meth:`Int8Bank.forward`):
- ONNX: ``DequantizeLinear`` on the int8 initializer (per axis). Neither onnxsim nor ONNX
  Runtime's optimiser folds it, so ``.onnx``, ``.sim.onnx`` and ``.ort`` keep int8 banks.
- ExecuTorch: an int8 constant, a cast and a multiply (the bank stays int8 in the ``.pte``).
- Core ML: ``quantize_per_channel`` of the constant, which coremltools turns into
  ``constexpr_affine_dequantize`` (iOS17 and later), decompressed by Core ML at load.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from odconv_deploy.errors import ODConvDeployError

#: The precisions an export can take: what the artifact stores and computes in. Which format
#: takes which is in the format table (:data:`export.formats.FORMATS`).
PRECISIONS: dict[str, str] = {
    "fp32": "float32 weights and compute (Core ML: --coreml-precision, fp16 by default)",
    "fp16": "float16 weights and compute",
    "int8w": "ODConv kernel banks stored int8 per output channel, computed in float",
}
#: int8 range of the symmetric scheme (-128 unused, so ``-q`` is always representable).
INT8_LIMIT = 127
#: The output-channel axis of the canonical bank layout ``[K, C_out, C_in/g, k, k]``.
CHANNEL_AXIS = 1


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
    """``q * scale`` per axis, exported to ONNX as one ``DequantizeLinear`` node."""

    @staticmethod
    def forward(ctx: object, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return _dequantize(q, scale)

    @staticmethod
    def symbolic(g: object, q: object, scale: object) -> object:  # noqa: D102
        return g.op("DequantizeLinear", q, scale, axis_i=CHANNEL_AXIS)


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = [1] * q.dim()
    shape[CHANNEL_AXIS] = -1
    return q.to(scale.dtype) * scale.reshape(shape)


def channel_scales(bank: torch.Tensor) -> torch.Tensor:
    """Per-output-channel int8 scales of a canonical bank; 1 for an all-zero channel."""
    dims = [d for d in range(bank.dim()) if d != CHANNEL_AXIS]
    peak = bank.detach().abs().amax(dim=dims)
    return torch.where(peak > 0, peak / INT8_LIMIT, torch.ones_like(peak))


class Int8Bank(nn.Module):
    """A kernel bank stored int8 with a scale per output channel (in the bank's dtype).

    Args:
        bank: The float bank in the canonical layout ``[K, C_out, C_in/g, k, k]``.
    """

    def __init__(self, bank: torch.Tensor) -> None:
        super().__init__()
        if bank.dim() != 5:
            raise ValueError(f"expected a [K, C_out, C_in/g, k, k] bank, got {tuple(bank.shape)}")
        scale = channel_scales(bank)
        shape = [1] * bank.dim()
        shape[CHANNEL_AXIS] = -1
        q = torch.round(bank.detach() / scale.reshape(shape))
        self.register_buffer("q", q.clamp(-INT8_LIMIT, INT8_LIMIT).to(torch.int8))
        self.register_buffer("scale", scale)
        # quantize_per_channel (the Core ML route) takes integer zero points.
        self.register_buffer("zero_point", torch.zeros(scale.shape, dtype=torch.int64),
                             persistent=False)

    def forward(self) -> torch.Tensor:
        """The dequantized bank ``q * s`` in the canonical layout (in ``scale``'s dtype)."""
        if torch.onnx.is_in_onnx_export():
            return _DequantizeLinear.apply(self.q, self.scale)
        bank = _dequantize(self.q, self.scale)
        if torch.jit.is_tracing():
            # The TorchScript trace coremltools converts: a quantize of a constant becomes a
            # constexpr_affine_dequantize of ``q`` (its round(q * s / s) gives back q exactly).
            bank = torch.quantize_per_channel(bank, self.scale, self.zero_point, CHANNEL_AXIS,
                                              torch.qint8).dequantize()
        return bank

    def extra_repr(self) -> str:  # noqa: D102
        return f"shape={tuple(self.q.shape)}, int8 per output channel"


def has_int8_banks(model: nn.Module) -> bool:
    """Whether any layer of ``model`` stores its kernel bank int8."""
    return any(isinstance(m, Int8Bank) for m in model.modules())


def weight_storage(model: nn.Module) -> str:
    """What an artifact of ``model`` stores its kernel banks as: ``int8w`` or ``float``."""
    return "int8w" if has_int8_banks(model) else "float"


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
