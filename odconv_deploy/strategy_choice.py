"""``strategy="auto"``: pick each layer's deploy form from the export target.

Every choice is one of the exact deploy forms, so ``auto`` goes through the same per-layer
float64 verification as a named strategy. The rules come from measurements on this project's
2-core x86 machine: whole models in ``runtime_bench/results/perf_targets.md`` (ratios to the
static twin), single depthwise layers in ``runtime_bench/results/depthwise_forms.md``:

- **ONNX / ORT with a fixed batch**: depthwise layers take ``dynamic_weight`` (ONNX Runtime's
  Conv with a computed ``[C, 1, k, k]`` weight beats the one-hot im2col + reduce, which writes
  ``k*k`` copies of the activation: od_mobilenetv2_100 k=4 batch 1 went from 4.45x to 2.71x);
  every other layer keeps ``im2col`` (od_resnet18: all-``dynamic_weight`` 2.0x vs ``im2col``
  1.8x).
- **ONNX / ORT with a dynamic batch**: stride-1 depthwise layers take ``depthwise_taps``, the
  rest ``im2col`` (``dynamic_weight`` would bake the batch into the graph). Per layer, 1 thread,
  the od_mobilenetv2_100 depthwise shapes: at stride 1 taps are 10-30% faster (144 ch at 56x56:
  3.44 vs 4.92 ms), at stride 2 38-68% slower (strided slices; 96 ch at 112x112: 6.49 vs
  4.70 ms). Whole od_mobilenetv2_100 k=4, batch 1: 4.53x -> 3.98x of static.
- **ExecuTorch (XNNPACK)**: depthwise layers take ``depthwise_taps`` (k*k strided slices scaled
  and summed instead of the one-hot im2col: od_mobilenetv2_100 k=4 went from 11.06x to 6.76x
  of static), every other layer ``im2col``; never ``dynamic_weight``, since XNNPACK does not
  delegate a conv whose weight is computed at run time (the reference graph runs 60x slower
  than static for that reason). Per layer, taps are 1.8-5.5x faster at stride 1 and mixed at
  stride 2 (96 ch at 112x112: 14.76 vs 17.71 ms; the three smaller stride-2 shapes 8-31%
  slower), 24.1 vs 26.0 ms summed over the stride-2 shapes, so all depthwise layers take taps.
- **CoreML**: ``im2col`` everywhere; coremltools 9 fails to convert od_mobilenetv2 as soon
  as its depthwise layers are ``dynamic_weight`` (TypeError on an ``int`` op in its torch
  frontend), while small networks with the same layers convert.
- **torch** (eager PyTorch): ``im2col`` everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from odconv_deploy.errors import UnsupportedLayerError
from odconv_deploy.layers.deploy import DEFAULT_STRATEGY, DEPLOY_STRATEGIES

if TYPE_CHECKING:
    from odconv_deploy.detect import ODConvSpec

AUTO_STRATEGY = "auto"
#: Export targets ``auto`` knows. ``ort`` and ``onnx`` are the same graphs.
AUTO_TARGETS = ("onnx", "ort", "coreml", "pte", "torch")


@dataclass(frozen=True)
class AutoStrategy:
    """The per-layer choice for one export target.

    Args:
        target: One of :data:`AUTO_TARGETS`.
        dynamic_batch: Whether the exported graph must accept any batch size.
    """

    target: str = "onnx"
    dynamic_batch: bool = True

    def __post_init__(self) -> None:
        if self.target not in AUTO_TARGETS:
            raise UnsupportedLayerError(
                f"strategy='auto' got target {self.target!r}. Note: choose one of "
                f"{', '.join(AUTO_TARGETS)}."
            )

    def choose(self, spec: ODConvSpec) -> str:
        """The deploy strategy for one layer (see the module docstring for why)."""
        if not spec.depthwise or self.target in ("coreml", "torch"):
            return DEFAULT_STRATEGY
        if self.target == "pte":
            return "depthwise_taps"
        if not self.dynamic_batch:  # ONNX / ORT, batch 1
            return "dynamic_weight"
        return "depthwise_taps" if spec.stride == 1 else DEFAULT_STRATEGY


def check_strategy_name(strategy: str) -> None:
    """Raise a clear error for a strategy that is neither a deploy form nor ``auto``."""
    if strategy != AUTO_STRATEGY and strategy not in DEPLOY_STRATEGIES:
        raise UnsupportedLayerError(
            f"Unknown deploy strategy {strategy!r}. Note: choose one of "
            f"{sorted(DEPLOY_STRATEGIES) + [AUTO_STRATEGY]}."
        )
