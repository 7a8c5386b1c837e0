"""How much of an artifact is the ODConv kernel banks, found in the file by content.

ODConv stores ``K`` kernels per layer, so the banks are most of a model's bytes (and what an
int8 or fp16 artifact shrinks). Each deploy layer's ``weight`` (its bank) is looked for among
the artifact's stored tensors by the digest of its values sorted, at the precisions a file
stores weights in (float32 and float16; int8 for an ``int8w`` bank, whose per-channel scales
count as the rest; a ``lut6w`` bank by its decompressed values, counted at the bytes of its
lookup table and indices): sorting makes the match independent of the layout the
exporter chose (the im2col form's bank is stored transposed in ONNX). A bank the exporter
folded into another constant is not found, and the split says how many were: the figure is
measured, never inferred from the model.

Measured for ``.onnx`` / ``.sim.onnx`` (initializers) and ``.mlpackage`` (the MIL program's
constants). ``.ort`` and ``.pte`` store tensors in their own flatbuffers; they are not split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
from torch import nn

from export.result import ExportFormat, ExportResult
from export.to_coreml import iter_mil_ops
from odconv_deploy.layers.deploy import ODConv2dDeploy

#: The formats whose stored tensors this module reads.
SPLIT_FORMATS = (ExportFormat.ONNX, ExportFormat.ONNX_SIMPLIFIED, ExportFormat.COREML)


def kernel_banks(model: nn.Module) -> list[np.ndarray]:
    """The kernel bank of every ODConv deploy layer as stored, in module order.

    float32 (``weight``), or int8 (the quantized values of an ``int8w`` bank).
    """
    banks = []
    for m in model.modules():
        if isinstance(m, ODConv2dDeploy):
            stored = m.weight if m.weight_int8 is None else m.weight_int8.q
            banks.append(stored.detach().cpu().numpy())
    return [b if b.dtype == np.int8 else b.astype(np.float32) for b in banks]


def _digest(values: np.ndarray) -> str:
    """The digest of a tensor's values in sorted order (the same for any layout of them)."""
    return hashlib.sha256(np.sort(values, axis=None).tobytes()).hexdigest()


def _onnx_tensors(result: ExportResult) -> Iterator[tuple[np.ndarray, int]]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(result.path)).graph
    for init in graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype.kind in "fi":
            yield value, value.nbytes


def _coreml_tensors(result: ExportResult) -> Iterator[tuple[np.ndarray, int]]:
    """Each constant's values and stored bytes.

    A palettized one (``constexpr_lut_to_dense``) gives its decompressed values and the bytes
    of its lookup table and indices.
    """
    from odconv_deploy.runners.mil import load_mil_program
    from odconv_deploy.runners.mil.loader import _as_value

    for op in iter_mil_ops(load_mil_program(str(result.path))):
        if op.op_type == "const" and op.outputs[0].val is not None:
            value = np.asarray(_as_value(op.outputs[0].val))
            if value.dtype.kind in "fi":
                yield value, value.nbytes
        elif op.op_type == "constexpr_lut_to_dense":
            stored = sum(np.asarray(_as_value(v.val)).nbytes for v in op.inputs.values()
                         if v.val is not None)
            yield np.asarray(op.materialized_val_inference()), stored


def size_split(result: ExportResult, banks: list[np.ndarray]) -> dict[str, object] | None:
    """``kernel_bank_bytes``, ``rest_bytes`` and how many banks were found in the file.

    None for a failed export, a format whose tensors are not read here (see
    :data:`SPLIT_FORMATS`), or a model without ODConv layers.
    """
    if not result.ok or result.format not in SPLIT_FORMATS or not banks:
        return None
    wanted: dict[str, int] = {}  # digest -> bytes, one entry per bank and stored precision
    for bank in banks:
        for dtype in (np.int8,) if bank.dtype == np.int8 else (np.float32, np.float16):
            stored = bank.astype(dtype)
            wanted[_digest(stored)] = stored.nbytes
    sizes = set(wanted.values())
    read = _coreml_tensors if result.format is ExportFormat.COREML else _onnx_tensors
    found_bytes, found = 0, 0
    for value, stored in read(result):
        if value.nbytes in sizes and (key := _digest(value)) in wanted:
            wanted.pop(key)
            found_bytes += stored
            found += 1
    return {"kernel_bank_bytes": found_bytes,
            "rest_bytes": max(result.file_size_bytes - found_bytes, 0),
            "banks_found": found, "banks": len(banks)}
