"""int8 ONNX (W8A8): the static convs and linears quantized by ONNX Runtime's static quantizer.

An ``int8`` ONNX graph is the int8w graph (ODConv kernel banks stored int8, computed in float)
in which every conv, Gemm and MatMul with a constant weight outside the ODConv layers (the
stem, downsampling shortcuts, static pointwise convs, the classifier) is quantized by
``onnxruntime.quantization.quantize_static``: QDQ format, weights int8 symmetric per output
channel, activations uint8 with ranges calibrated on real inputs (MinMax). ONNX Runtime fuses
each ``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv`` and computes it in
int8.

What stays float, and why: the ODConv layers' weights are computed per input (no quantizer
takes a run-time weight per channel, nor does ONNX Runtime's ``QLinearConv`` prepack one), and
their attention branches decide which kernel a sample gets; quantizing their small Gemms would
move that choice for a few bytes.

Which nodes belong to an ODConv layer is read from the torchscript exporter's node names, the
module path of every node (``/layer1/layer1.0/conv1/attention_fc/Gemm``), resolved against the
model's modules; a node whose path does not resolve is left float (and counted).
"""

from __future__ import annotations

import logging
import os
import platform
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from export.result import ExportError
from odconv_deploy.calibration import CalibrationSet
from odconv_deploy.errors import require_backend

#: The ops ONNX Runtime's quantizer turns into int8 kernels here (QLinearConv, QGemm, ...).
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class QuantizationPlan:
    """Which nodes of a graph are quantized, and which are not and why.

    Attributes:
        static: Names of the conv / Gemm / MatMul nodes to quantize.
        odconv: How many such nodes lie in ODConv layers (float by design).
        computed_weight: How many take a weight computed in the graph (float: no constant).
        unresolved: Nodes whose module path did not resolve (kept float, to be safe).
    """

    static: tuple[str, ...]
    odconv: int
    computed_weight: int
    unresolved: tuple[str, ...]

    def describe(self) -> str:
        """One line for notes and reports."""
        text = (f"{len(self.static)} static conv/linear nodes int8 (QDQ); float: "
                f"{self.odconv} in ODConv layers, {self.computed_weight} with a computed weight")
        if self.unresolved:
            text += f", {len(self.unresolved)} of unknown module (e.g. {self.unresolved[0]})"
        return text


def module_path(node_name: str, model: nn.Module) -> str | None:
    """The dotted module path of a torchscript-exported node name, or None if it is not found.

    The exporter names each scope by the module's attribute name, containers' children as
    ``<container segment>.<index>`` (``/features/features.1/conv/conv.0/Conv`` is
    ``features.1.conv.0``).
    """
    segments = node_name.strip("/").split("/")[:-1]
    module, previous, path = model, "", []
    for segment in segments:
        children = dict(module.named_children())
        child = segment if segment in children else None
        if child is None and previous and segment.startswith(previous + "."):
            child = segment[len(previous) + 1:]
        if child is None or child not in children:
            return None
        module, previous = children[child], segment
        path.append(child)
    return ".".join(path)


def plan_quantization(proto: object, model: nn.Module, odconv_layers: list[str]
                      ) -> QuantizationPlan:
    """The static nodes of ``proto`` to quantize (see the module docstring)."""
    constants = {i.name for i in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    static, unresolved = [], []
    odconv = computed = 0
    for node in proto.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        path = module_path(node.name, model)
        if path is None:
            unresolved.append(node.name)
        elif any(path == p or path.startswith(p + ".") for p in odconv_layers):
            odconv += 1
        elif len(node.input) < 2 or node.input[1] not in constants:
            computed += 1
        else:
            static.append(node.name)
    return QuantizationPlan(tuple(static), odconv, computed, tuple(unresolved))


def _reader(base: type, calibration: CalibrationSet, input_names: list[str], batch: int
            ) -> object:
    """ONNX Runtime's calibration reader (a subclass of ``base``) over ``calibration``.

    The samples are stacked ``batch`` at a time: a graph with a fixed batch takes no other.
    """
    missing = [n for n in input_names if n not in calibration.feeds[0]]
    if missing:
        raise ExportError(f"Calibration samples lack the graph's input(s) {missing}; they have "
                          f"{sorted(calibration.feeds[0])}.")
    if len(calibration) < batch:
        raise ExportError(f"The graph has a fixed batch of {batch} and the calibration "
                          f"{len(calibration)} samples. Note: give at least {batch}.")
    feeds = iter([{n: np.ascontiguousarray(b[n]) for n in input_names}
                  for b in calibration.batches(batch, whole_only=True)])

    class Reader(base):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(feeds, None)

    return Reader()


def quantize_static_nodes(source: str | os.PathLike, target: str | os.PathLike,
                          plan: QuantizationPlan, calibration: CalibrationSet, *,
                          reduce_range: bool = False, batch: int = 1) -> dict[str, int]:
    """Write ``source`` quantized to ``target``: the plan's nodes QDQ int8, calibrated.

    ``reduce_range`` quantizes weights to 7 bits, for x86 CPUs without VNNI whose U8S8 kernels
    saturate an int16 sum of two 8-bit products (ONNX Runtime's advice); ARM does not need it.
    ``batch`` is the graph's fixed batch (1 for a dynamic one).

    Returns:
        The op counts of the quantized graph.
    """
    onnx = require_backend("onnx", extra="onnx", purpose="int8 quantization")
    quantization = require_backend("onnxruntime.quantization", extra="onnx",
                                   purpose="int8 quantization")
    if not plan.static:
        raise ExportError("The graph has no static conv or linear outside the ODConv layers, so "
                          "int8 would quantize nothing beyond int8w. Note: use --precision "
                          "int8w.")
    names = [i.name for i in onnx.load(str(source), load_external_data=False).graph.input]
    reader = _reader(quantization.CalibrationDataReader, calibration, names, batch)
    root = logging.getLogger()  # the quantizer's advice to pre-process goes to the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantization.quantize_static(
            str(source), str(target), reader, quant_format=quantization.QuantFormat.QDQ,
            per_channel=True, reduce_range=reduce_range,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax,
            nodes_to_quantize=list(plan.static),
            # Linear outputs stay float (QGemm writes float): logits keep their resolution.
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                           "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]})
    except Exception as exc:
        raise ExportError(f"onnxruntime's static quantization failed: {type(exc).__name__}: "
                          f"{exc}") from exc
    finally:
        root.setLevel(level)
    quantized = onnx.load(str(target), load_external_data=False)
    return dict(Counter(n.op_type for n in quantized.graph.node))


def x86_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (None on other architectures or without /proc/cpuinfo)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return "avx512_vnni" in flags or "avx_vnni" in flags


def int8_cpu_note(reduce_range: bool) -> str:
    """What this CPU means for the int8 kernels' numbers (for reports)."""
    machine = platform.machine()
    vnni = x86_vnni()
    if vnni is None:
        return (f"int8 kernels ran on {machine}: ONNX Runtime's int8 GEMMs there do not "
                "saturate.")
    if vnni:
        return (f"int8 kernels ran on {machine} with VNNI: ONNX Runtime's U8S8 kernels do not "
                "saturate here. An x86 CPU without VNNI (AVX2 only) can saturate them (an "
                "int16 sum of two u8*s8 products); export for such hosts with "
                "--int8-reduce-range.")
    return (f"int8 kernels ran on {machine} without VNNI: ONNX Runtime's U8S8 kernels sum two "
            "u8*s8 products in int16 and can saturate" + (
                "; this graph's 7-bit weights (--int8-reduce-range) avoid it."
                if reduce_range else
                ", so the figures here may be worse than on ARM or a VNNI CPU. Note: for x86 "
                "hosts like this one export with --int8-reduce-range."))

