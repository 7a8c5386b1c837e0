"""im2col as one constant one-hot grouped conv: runs everywhere and never exceeds rank 4.

``F.unfold`` exports to a slow rank-6 ONNX pattern and does not convert to CoreML; k*k
strided slices plus a concat work everywhere but cost many small copies and split
ExecuTorch graphs into dozens of delegates. A grouped conv with a one-hot kernel per tap does
the same job in one op that every backend runs (and XNNPACK delegates): output channel
``c*k*k + t`` holds input channel ``c`` shifted by tap ``t``. Multiplying by exact ones and
zeros, it is exact for finite inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def onehot_tap_kernel(channels: int, kernel_size: int, dtype: torch.dtype = torch.float32
                      ) -> torch.Tensor:
    """The ``[channels*k*k, 1, k, k]`` one-hot kernel used by :func:`im2col`."""
    taps = kernel_size * kernel_size
    eye = torch.eye(taps, dtype=dtype).reshape(taps, 1, kernel_size, kernel_size)
    return eye.repeat(channels, 1, 1, 1)


def im2col(x: torch.Tensor, kernel: torch.Tensor, kernel_size: int, stride: int, padding: int,
           dilation: int) -> torch.Tensor:
    """Columns ``[B, C*k*k, H_out, W_out]`` of ``x``, channel-major (index ``c*k*k + t``).

    ``kernel`` is :func:`onehot_tap_kernel` for ``x``'s channel count. Channel-major order
    is also group-major, so grouped matmuls and grouped 1x1 convs need no reordering.
    """
    if kernel_size == 1 and padding == 0:
        return x[:, :, ::stride, ::stride] if stride > 1 else x
    return F.conv2d(x, kernel, None, stride, padding, dilation, groups=x.shape[1])
