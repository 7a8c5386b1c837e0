"""int8 ExecuTorch (W8A8): the static convs and linears quantized by the XNNPACK PT2E quantizer.

The ExecuTorch counterpart of :mod:`export.quantize_onnx`: the int8w deploy model, exported
with ``torch.export``, goes through ``prepare_pt2e`` with ExecuTorch's ``XNNPACKQuantizer``
set on the static convs and linears only (symmetric int8 weights per output channel, int8
activations per tensor, calibrated), then ``convert_pt2e``. XNNPACK runs those as int8
kernels; the ODConv layers (weights computed per input, which XNNPACK's convs refuse) stay
float with their banks int8w.

The converted program is PyTorch: its quantize / dequantize ops compute the int8 semantics in
float, so it is the reference the ``.pte`` is checked against. It is saved beside the ``.pte``
(``<stem>.int8_reference.pt2``, :func:`load_reference`) so that ``validate --pte`` of an int8
program can check it later.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from export.result import ExportError, pt2e_reference_path
from odconv_deploy.calibration import CalibrationSet

#: Calibration batches stay within the program's dynamic batch range.
_CALIBRATION_BATCH = 16


def static_module_names(model: nn.Module, odconv_layers: list[str]) -> list[str]:
    """The ``nn.Conv2d`` / ``nn.Linear`` modules of ``model`` outside the ODConv layers."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
            and not any(n == p or n.startswith(p + ".") for p in odconv_layers)]


def quantize_program(exported: torch.export.ExportedProgram, names: list[str],
                     calibration: CalibrationSet, *, dynamic_batch: bool) -> nn.Module:
    """The PT2E-quantized module of ``exported``: modules ``names`` int8, calibrated.

    Raises:
        ExportError: Nothing to quantize, or the quantizer failed.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not names:
        raise ExportError("The model has no static conv or linear outside the ODConv layers, so "
                          "int8 would quantize nothing beyond int8w. Note: use --precision "
                          "int8w.")
    quantizer = XNNPACKQuantizer()
    config = get_symmetric_quantization_config(is_per_channel=True)
    for name in names:
        quantizer.set_module_name(name, config)
    step = _CALIBRATION_BATCH if dynamic_batch else 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_pt2e(exported.module(), quantizer)
            with torch.no_grad():
                for batch in calibration.batches(step):
                    prepared(*(torch.from_numpy(v) for v in batch.values()))
            return convert_pt2e(prepared)
    except Exception as exc:
        raise ExportError(f"PT2E quantization (XNNPACKQuantizer) failed: {type(exc).__name__}: "
                          f"{exc}") from exc


class ReferenceProgram(nn.Module):
    """A saved int8 reference program as a module (exported programs refuse ``eval()``)."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.program = program.module()

    def train(self, mode: bool = True) -> ReferenceProgram:  # noqa: D102 - inference only
        return self

    def forward(self, *inputs: torch.Tensor) -> object:  # noqa: D102
        return self.program(*inputs)


def load_reference(pte: str | os.PathLike) -> ReferenceProgram:
    """The PyTorch reference saved beside an int8 ``.pte``.

    Raises:
        ExportError: It is missing or unreadable.
    """
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401 - registers the q/dq ops it reads

    path = pt2e_reference_path(pte)
    if not path.is_file():
        raise ExportError(f"{pte} is an int8 program and its PyTorch reference {path.name} is "
                          "not beside it. Note: keep the two files together (export writes "
                          "both), or validate by exporting again.")
    try:
        return ReferenceProgram(torch.export.load(str(path)))
    except Exception as exc:
        raise ExportError(f"{path} could not be loaded: {type(exc).__name__}: {exc}") from exc
