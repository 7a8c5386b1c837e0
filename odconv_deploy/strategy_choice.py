"""``strategy="auto"``: pick each layer's deploy form from the export target.

Every choice is one of the exact deploy forms, so ``auto`` goes through the same per-layer
float64 verification as a named strategy. The rules come from measurements on this project's
2-core x86 machine: whole models in ``runtime_bench/results/perf_targets.md`` (ratios to the
static twin), single depthwise layers in ``runtime_bench/results/depthwise_forms.md``:

- **ONNX with a fixed batch** (a portable graph): every layer takes ``dynamic_weight``: ONNX
  Runtime's own Conv on the computed weight beats both the one-hot im2col + MatMul (which
  pays for the im2col map) and, for depthwise layers, the one-hot im2col + reduce (which
  writes ``k*k`` copies of the activation). Whole models, batch 1, 1 thread, against the
  dynamic-batch ``im2col`` graph: od_resnet18 k=4 1.77x -> 1.60x of static, k=1 1.46x ->
  1.33x, od_mobilenetv2_100 k=4 4.89x -> 2.57x.
- **ORT (ONNX Runtime CPU on this machine) with a fixed batch**: as ONNX, except that the
  ``k > 1`` regular and depthwise layers whose channels fit the CPU's NCHWc block take
  ``ort_nchwc`` (the computed weight runs ORT's blocked conv kernels; the graph then runs
  only on ONNX Runtime CPUs with the same block, see :mod:`odconv_deploy.layers.ort_nchwc`).
  Where this onnxruntime has no NCHWc kernels, ``dynamic_weight`` as for ONNX. Whole models,
  batch 1, 1 thread, ratio to static against the ``dynamic_weight`` graph: od_resnet18 k=4
  1.54x -> 1.37x, k=1 1.31x -> 1.15x, od_mobilenetv2_100 k=4 2.50x -> 1.89x. Single depthwise
  layers of od_mobilenetv2_100: 2.0-2.6x faster than ``dynamic_weight`` (96 ch at 112x112,
  stride 2: 0.96 vs 2.26 ms; static 0.75 ms).
- **ONNX / ORT with a dynamic batch**: stride-1 depthwise layers take ``depthwise_taps``, the
  rest ``im2col`` (``dynamic_weight`` would bake the batch into the graph). Per layer, 1 thread,
  the od_mobilenetv2_100 depthwise shapes: at stride 1 taps are 7-27% faster (144 ch at 56x56:
  3.64 vs 5.01 ms), at stride 2 23-48% slower (96 ch at 112x112: 5.89 vs 4.78 ms).
  Whole od_mobilenetv2_100 k=4, batch 1: 4.48x -> 3.84x of static.
- **ExecuTorch (XNNPACK)**: depthwise layers take ``depthwise_taps`` (every other layer
  ``im2col``): per layer it beats the one-hot im2col at every od_mobilenetv2_100 shape, 1.9-4.8x
  at stride 1 and 1.2-2.4x at stride 2, where it reads the taps from the input's phases (96 ch
  at 112x112: 6.98 vs 16.59 ms; 14.76 ms with strided slices, which XNNPACK leaves out).
  Never ``dynamic_weight``: XNNPACK does not delegate a conv whose weight is computed at run
  time (the reference graph runs 60x slower than static for that reason).
- **CoreML**: ``im2col`` everywhere; coremltools 9 fails to convert od_mobilenetv2 as soon
  as its depthwise layers are ``dynamic_weight`` (TypeError on an ``int`` op in its torch
  frontend), while small networks with the same layers convert.
- **torch** (eager PyTorch): ``im2col`` everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from odconv_deploy.errors import UnsupportedLayerError
from odconv_deploy.layers.deploy import DEFAULT_STRATEGY, DEPLOY_STRATEGIES
from odconv_deploy.layers.ort_nchwc import nchwc_unsupported_reason, ort_nchwc_block
from odconv_deploy.layers.spec import ODConvSpec

AUTO_STRATEGY = "auto"
#: Export targets ``auto`` knows. ``onnx`` graphs run anywhere; ``ort`` ones (the same with
#: a dynamic batch) may use ONNX Runtime's CPU kernels of this machine.
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
        if self.target == "ort" and not self.dynamic_batch:
            block = ort_nchwc_block()
            fits = block is not None and nchwc_unsupported_reason(
                spec.in_channels, spec.out_channels, spec.kernel_size, spec.groups, block) is None
            return "ort_nchwc" if fits else "dynamic_weight"
        if self.target == "onnx" and not self.dynamic_batch:
            return "dynamic_weight"
        if not spec.depthwise or self.target in ("coreml", "torch"):
            return DEFAULT_STRATEGY
        if self.target == "pte":
            return "depthwise_taps"
        return "depthwise_taps" if spec.stride == 1 else DEFAULT_STRATEGY


def check_strategy_name(strategy: str) -> None:
    """Raise a clear error for a strategy that is neither a deploy form nor ``auto``."""
    if strategy != AUTO_STRATEGY and strategy not in DEPLOY_STRATEGIES:
        raise UnsupportedLayerError(
            f"Unknown deploy strategy {strategy!r}. Note: choose one of "
            f"{sorted(DEPLOY_STRATEGIES) + [AUTO_STRATEGY]}."
        )
