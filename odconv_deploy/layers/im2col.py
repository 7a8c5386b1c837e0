"""im2col with pad + strided slices: runs in every runtime and never exceeds rank 4.

``F.unfold`` exports to a slow rank-6 ONNX pattern and does not convert to CoreML; k*k
strided slices of the zero-padded input do the same job with ops every backend supports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_taps(
    x: torch.Tensor, kernel_size: int, stride: int, padding: int, dilation: int
) -> list[torch.Tensor]:
    """The ``k*k`` shifted, strided views of ``x`` that a convolution reads.

    Tap ``(i, j)`` (row-major, index ``i*k + j``) is ``[B, C, H_out, W_out]`` and holds
    ``x_pad[:, :, i*d + s*oh, j*d + s*ow]``. The slice ends are negative offsets from the end,
    so no output size is baked in: the same graph serves any input height and width.
    """
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    span = dilation * (kernel_size - 1)
    taps = []
    for i in range(kernel_size):
        row_end = i * dilation - span or None
        for j in range(kernel_size):
            col_end = j * dilation - span or None
            taps.append(x[:, :, i * dilation:row_end:stride, j * dilation:col_end:stride])
    return taps


def group_major(cols: torch.Tensor, taps: int, groups: int) -> torch.Tensor:
    """Reorder tap-major channels ``[B, taps*C, ...]`` to group-major ``[B, groups*taps*C/g, ...]``.

    Tap-major index ``t*C + gi*C/g + c`` becomes ``gi*taps*C/g + t*C/g + c``, the layout a
    grouped conv or a per-group matmul needs. Done with rank-4 reshapes and one transpose.
    """
    if groups == 1:
        return cols
    batch, channels = cols.shape[0], cols.shape[1]
    spatial = cols.shape[2:]
    out = cols.reshape(batch, taps, groups, -1).transpose(1, 2)
    return out.reshape((batch, channels) + tuple(spatial))
