"""``strategy="auto"``: pick each layer's deploy form from the export target.

Every choice is one of the exact deploy forms, so ``auto`` goes through the same per-layer
float64 verification as a named strategy. Targets are named by the runtime that will run the
graph (:data:`AUTO_TARGETS`). The rules, each set by a measurement recorded with its figures
in ``runtime_bench/results/auto_rules.md``:

- **onnx, fixed batch** (a portable graph): every layer takes ``dynamic_weight``: ONNX
  Runtime's own Conv on the computed weight beats both the one-hot im2col + MatMul (which pays
  for the im2col map) and, for depthwise layers, the one-hot im2col + reduce (which writes
  ``k*k`` copies of the activation).
- **onnxruntime** (ONNX Runtime CPU on this machine), **fixed batch**: as onnx, except that
  regular layers (channels multiples of 4, padded to whole blocks of the CPU's NCHWc block)
  and depthwise ones (channels in whole blocks) take ``ort_nchwc``
  (the computed weight runs ORT's blocked conv kernels, and the maps stay blocked between
  such layers; the graph then runs only on ONNX Runtime CPUs with the same block, see
  :mod:`odconv_deploy.layers.ort_nchwc`). 1x1 layers too: alone they gain nothing, inside a
  chain they do (od_mobilenetv2_100 11% faster whole, od_resnet50 1-2%; docs/performance.md).
  Where this onnxruntime has no NCHWc kernels, ``dynamic_weight`` as for onnx.
- **onnx / onnxruntime, dynamic batch**: stride-1 depthwise layers take ``depthwise_taps``,
  the rest ``im2col`` (``dynamic_weight`` would bake the batch into the graph); at stride 2 the
  taps are slower than im2col.
- **executorch** (XNNPACK): depthwise layers take ``depthwise_taps`` (every other layer
  ``im2col``), faster than the one-hot im2col at every od_mobilenetv2_100 shape. Never
  ``dynamic_weight``: XNNPACK does not delegate a conv whose weight is computed at run time.
  ``dynamic_linear`` (a run-time-weight linear, which XNNPACK does delegate) is left to
  ``tune``: it wins or loses by ``C_out`` against the output pixels, which these rules, given
  no input size, cannot see.
- **coreml**: ``im2col`` everywhere; coremltools 9 fails to convert od_mobilenetv2 as soon as
  its depthwise layers are ``dynamic_weight``.
- **torch** (eager PyTorch): ``im2col`` everywhere.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from odconv_deploy.errors import UnsupportedLayerError
from odconv_deploy.layers.deploy import DEFAULT_STRATEGY, DEPLOY_STRATEGIES
from odconv_deploy.layers.ort_nchwc import nchwc_unsupported_reason, ort_nchwc_block
from odconv_deploy.layers.spec import ODConvSpec

AUTO_STRATEGY = "auto"
#: Each layer's form chosen by timing every exact form it admits on the target runtime
#: (``runtime_bench.tune``); where no tuned plan is given, ``auto``'s rules.
TUNE_STRATEGY = "tune"
#: Export targets ``auto`` knows, named by the runtime that runs the graph. ``onnx`` graphs
#: run on any ONNX runtime; ``onnxruntime`` ones (the same with a dynamic batch) may use ONNX
#: Runtime's CPU kernels of this machine.
AUTO_TARGETS = ("onnx", "onnxruntime", "coreml", "executorch", "torch")
#: Target spellings of 0.1 (``ort``, ``pte`` are file formats), accepted for one release.
DEPRECATED_TARGETS = {"ort": "onnxruntime", "pte": "executorch"}


def canonical_target(target: str, *, warn: bool = True) -> str:
    """``target``, a deprecated spelling replaced by today's name.

    A deprecated spelling also raises a ``DeprecationWarning`` unless ``warn`` is False (a
    name read from a file that 0.1 wrote).
    """
    new = DEPRECATED_TARGETS.get(target)
    if new is None:
        return target
    if warn:
        warnings.warn(f"target {target!r} is deprecated and will be removed in the next "
                      f"release; use {new!r}", DeprecationWarning, stacklevel=3)
    return new


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
        object.__setattr__(self, "target", canonical_target(self.target))
        if self.target not in AUTO_TARGETS:
            raise UnsupportedLayerError(
                f"strategy='auto' got target {self.target!r}. Note: choose one of "
                f"{', '.join(AUTO_TARGETS)}."
            )

    def choose(self, spec: ODConvSpec) -> str:
        """The deploy form of one layer (see the module docstring for why)."""
        if self.target == "onnxruntime" and not self.dynamic_batch:
            block = ort_nchwc_block()
            fits = block is not None and nchwc_unsupported_reason(
                spec.in_channels, spec.out_channels, spec.kernel_size, spec.groups, block) is None
            return "ort_nchwc" if fits else "dynamic_weight"
        if self.target == "onnx" and not self.dynamic_batch:
            return "dynamic_weight"
        if not spec.depthwise or self.target in ("coreml", "torch"):
            return DEFAULT_STRATEGY
        if self.target == "executorch":
            return "depthwise_taps"
        return "depthwise_taps" if spec.stride == 1 else DEFAULT_STRATEGY


def admissible_forms(spec: ODConvSpec, target: str, dynamic_batch: bool) -> tuple[str, ...]:
    """The exact deploy forms a layer can take for ``target`` (what ``tune`` times).

    ``im2col`` and ``static_weight`` (constant conv weights; XNNPACK delegates its convs) fit
    every target; ``depthwise_taps`` depthwise layers; ``dynamic_weight`` ONNX graphs with a
    fixed batch (it bakes the batch in; XNNPACK does not delegate a run-time conv weight, and
    coremltools fails on depthwise ones); ``dynamic_linear`` fixed-batch ExecuTorch programs,
    for regular stride-1 layers (XNNPACK's fully-connected takes a run-time weight);
    ``ort_nchwc`` fixed-batch ONNX Runtime graphs on a CPU with NCHWc kernels, for layers
    whose channels fit its block.
    """
    target = canonical_target(target, warn=False)
    forms = [DEFAULT_STRATEGY, "static_weight"]
    if spec.depthwise:
        forms.append("depthwise_taps")
    if not dynamic_batch and target in ("onnx", "onnxruntime"):
        forms.append("dynamic_weight")
    if not dynamic_batch and target == "executorch" and spec.groups == 1 and spec.stride == 1:
        forms.append("dynamic_linear")
    if not dynamic_batch and target == "onnxruntime":
        block = ort_nchwc_block()
        if block is not None and nchwc_unsupported_reason(
                spec.in_channels, spec.out_channels, spec.kernel_size, spec.groups,
                block) is None:
            forms.append("ort_nchwc")
    return tuple(forms)


def check_strategy_name(strategy: str) -> None:
    """Raise a clear error for a strategy that is neither a deploy form nor ``auto``."""
    if strategy not in (AUTO_STRATEGY, TUNE_STRATEGY) and strategy not in DEPLOY_STRATEGIES:
        raise UnsupportedLayerError(
            f"Unknown deploy strategy {strategy!r}. Note: choose one of "
            f"{sorted(DEPLOY_STRATEGIES) + [AUTO_STRATEGY, TUNE_STRATEGY]}."
        )
