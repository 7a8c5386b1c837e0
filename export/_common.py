"""Shared pieces of the exporters: results, formats, model preparation, tool versions."""

from __future__ import annotations

import enum
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from odconv_deploy._version import package_versions
from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.io_spec import IOSpec, TensorSpec
from odconv_deploy.layers.deploy import DEFAULT_STRATEGY, ODConv2dDeploy
from odconv_deploy.layers.ort_nchwc import OrtNchwcODConv2d
from odconv_deploy.model_source import ModelSourceError, describe_io
from odconv_deploy.reparameterize import convert_model, find_odconv_layers
from odconv_deploy.status import Status
from odconv_deploy.strategy_choice import AUTO_STRATEGY


class ExportError(ODConvDeployError, RuntimeError):
    """An export that could not be completed; the message names the cause."""


class ExportFormat(str, enum.Enum):
    """Artifact formats."""

    ONNX = "onnx"
    ONNX_SIMPLIFIED = "onnx-sim"
    COREML = "coreml"
    ORT = "ort"
    EXECUTORCH = "pte"


@dataclass
class ExportResult:
    """What one export produced.

    Attributes:
        format: Artifact format.
        path: The artifact (a file, or a folder for ``.mlpackage``).
        input_names, output_names: I/O names in the artifact.
        ok, error: False and the reason when the step failed (no artifact was written).
        input_shapes, output_shapes: Shapes; symbolic dims are strings (e.g. ``"batch"``).
        file_size_bytes: Size on disk (folders summed).
        options: The options used (opset, precision, strategy, ...).
        tool_versions: Versions of the libraries that produced it.
        op_counts: Operator type -> count in the artifact.
        notes: Anything noteworthy (e.g. what was not delegated).
        details: Format-specific figures (node counts before/after, delegation shares, ...).
    """

    format: ExportFormat
    path: Path
    input_names: list[str]
    output_names: list[str]
    input_shapes: dict[str, list[int | str]]
    output_shapes: dict[str, list[int | str]]
    file_size_bytes: int
    options: dict[str, object] = field(default_factory=dict)
    tool_versions: dict[str, str] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)
    ok: bool = True
    error: str | None = None

    @property
    def status(self) -> Status:
        """``ok``, or ``failed`` (the reason in ``error``)."""
        return Status.OK if self.ok else Status.FAILED

    @property
    def dynamic_batch(self) -> bool:
        """Whether the first input's batch axis is symbolic."""
        first = self.input_shapes[self.input_names[0]]
        return bool(first) and isinstance(first[0], str)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        data = asdict(self)
        data["format"] = self.format.value
        data["path"] = str(self.path)
        data["status"] = self.status.value
        return data

    def summary(self) -> str:
        """One line for the CLI."""
        if not self.ok:
            return f"{self.format.value:<9} FAILED: {self.error}"
        shapes = ", ".join(f"{n}{list(s)}" for n, s in self.input_shapes.items())
        ops = f", {sum(self.op_counts.values())} ops" if self.op_counts else ""
        return (f"{self.format.value:<9} {self.path}  ({self.file_size_bytes / 1e6:.1f} MB"
                f"{ops}, inputs {shapes})")


def tool_versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` plus odconv-deploy and torch (the one stamp)."""
    return package_versions(*packages)


def path_size(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@dataclass
class PreparedModel:
    """A deploy-form model ready to trace, its I/O spec and how it was obtained."""

    model: nn.Module
    io_spec: IOSpec
    name: str
    strategy: str | None  # None when the model has no ODConv layer; "auto", "mixed" possible
    converted_layers: int
    #: Deploy form -> number of layers that use it.
    layer_strategies: dict[str, int] = field(default_factory=dict)


def resolve_io_spec(model: nn.Module, io_spec: IOSpec | None,
                    input_shape: tuple[int, ...] | None) -> IOSpec:
    """The I/O spec to export with: given, else ``input_shape``, else ``model.io_spec``."""
    if io_spec is not None:
        return io_spec
    if input_shape is not None:
        if len(input_shape) < 2:
            raise ExportError(f"input_shape={input_shape} must include the batch axis.")
        shape = (1,) + tuple(input_shape[1:])
        return IOSpec(inputs=(TensorSpec("input", shape),), outputs=(TensorSpec("output", ()),),
                      mean=None, std=None, task="generic")
    spec = getattr(model, "io_spec", None)
    if isinstance(spec, IOSpec):
        return spec
    raise ExportError(
        f"{type(model).__name__} declares no io_spec. Note: pass input_shape=(1, C, H, W) "
        "(CLI: --input-shape) or an IOSpec."
    )


def prepare_model(model: nn.Module, *, strategy: str | None = None, target: str = "onnx",
                  dynamic_batch: bool = True, io_spec: IOSpec | None = None,
                  input_shape: tuple[int, ...] | None = None, name: str | None = None
                  ) -> PreparedModel:
    """Convert a train-form model to its deploy form (if needed) and check that it runs.

    Args:
        model: Train form or deploy form (any network with ODConv layers, or none).
        strategy: Deploy strategy for train-form layers (default: ``im2col``), or ``auto``.
        target: The export target ``auto`` chooses for.
        dynamic_batch: Whether the export keeps the batch dynamic (``auto`` needs to know).
        io_spec: The model's I/O contract (default: ``model.io_spec`` or ``input_shape``).
        input_shape: Input shape for models without an ``io_spec``.
        name: Name stamped into the artifacts (default: the zoo name or the class name).

    Raises:
        ExportError: The model does not run on its declared input, or returns something other
            than tensors.
    """
    spec = resolve_io_spec(model, io_spec, input_shape)
    name = name or getattr(model, "zoo_name", None) or type(model).__name__
    converted = 0
    if find_odconv_layers(model):
        result = convert_model(model, strategy=strategy or DEFAULT_STRATEGY, target=target,
                               dynamic_batch=dynamic_batch)
        model, converted = result.model, len(result.layers)
        strategy = result.strategy
    else:
        strategies = {m.strategy for m in model.modules() if isinstance(m, ODConv2dDeploy)}
        if strategy not in (None, AUTO_STRATEGY) and strategies and strategies != {strategy}:
            raise ExportError(
                f"The model is already in deploy form with strategy {sorted(strategies)}, not "
                f"{strategy!r}. Note: pass the train-form model to choose the strategy."
            )
        if strategy != AUTO_STRATEGY or not strategies:  # auto: the caller's conversion
            strategy = (None if not strategies else next(iter(strategies))
                        if len(strategies) == 1 else "mixed")
    layer_strategies = dict(Counter(m.strategy for m in model.modules()
                                    if isinstance(m, ODConv2dDeploy)))
    if target not in ("onnx", "ort") and OrtNchwcODConv2d.strategy in layer_strategies:
        raise ExportError(
            f"{name} has {OrtNchwcODConv2d.strategy!r} layers, which only ONNX Runtime runs "
            f"(its NCHWc CPU kernels); {target} cannot. Note: pass the train-form model "
            "with strategy='auto' to choose each layer's form for this target.")
    try:  # runs the model once and names its outputs (a dict-returning one gets wrapped)
        model, spec = describe_io(model.eval(), name, spec, None)
    except ModelSourceError as exc:
        raise ExportError(str(exc)) from exc
    return PreparedModel(model, spec, name, strategy, converted, layer_strategies)


def nchwc_block_of(model: nn.Module) -> int | None:
    """The NCHWc block the model's ``ort_nchwc`` layers are laid out for, or None if none.

    Raises:
        ExportError: Layers laid out for different blocks (no CPU runs both).
    """
    blocks = {m.block for m in model.modules() if isinstance(m, OrtNchwcODConv2d)}
    if len(blocks) > 1:
        raise ExportError(f"The model's ort_nchwc layers are laid out for different NCHWc "
                          f"blocks {sorted(blocks)}; one graph runs on one block. Note: "
                          "convert all layers for the same block.")
    return next(iter(blocks), None)


def format_layer_strategies(layer_strategies: dict[str, int]) -> str:
    """``"dynamic_weight:17,im2col:35"`` (sorted), or ``"none"``: for artifact metadata."""
    return ",".join(f"{k}:{v}" for k, v in sorted(layer_strategies.items())) or "none"


def require_dynamic_batch_support(prepared: PreparedModel, option: str) -> None:
    """Refuse a dynamic batch when a deploy layer bakes the batch into exported graphs.

    Args:
        prepared: The prepared model.
        option: The exporter's argument that turns the dynamic batch off (for the message).

    Raises:
        ExportError: Some layer's strategy cannot take a dynamic batch.
    """
    fixed = sorted({m.strategy for m in prepared.model.modules()
                    if isinstance(m, ODConv2dDeploy) and not m.supports_dynamic_batch})
    if fixed:
        raise ExportError(
            f"Strategy {fixed[0]!r} bakes the batch into exported graphs, so a "
            f"dynamic batch is impossible. Note: pass {option}=False (CLI: --static-batch) "
            "or use the 'im2col' or 'static_weight' strategy."
        )


def check_batch_size(batch_size: int, dynamic_batch: bool) -> None:
    """Refuse a fixed batch size that is not a positive int, or one given with a dynamic batch."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ExportError(f"batch_size must be a positive int, got {batch_size!r}.")
    if dynamic_batch and batch_size != 1:
        raise ExportError(
            f"batch_size={batch_size} fixes the batch, but dynamic_batch=True asks for any "
            "batch. Note: pass dynamic_batch=False (CLI: --static-batch) to bake it in."
        )


def spec_shapes(tensors: tuple[TensorSpec, ...], dynamic_batch: bool
                ) -> dict[str, list[int | str]]:
    """Name -> shape of spec tensors, the batch axis as ``"batch"`` when it is dynamic."""
    batch: list[int | str] = ["batch" if dynamic_batch else 1]
    return {t.name: batch + list(t.shape[1:]) for t in tensors}


def root_cause(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line`` of the innermost cause of ``exc`` (ANSI colours removed)."""
    import re

    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = text.splitlines()[0] if text else "no detail"
    return f"{type(exc).__name__}: {first[:limit]}"


def artifact_result(fmt: ExportFormat, path: str | os.PathLike, io_spec: IOSpec, *,
                    dynamic_batch: bool = True) -> ExportResult:
    """Describe an existing artifact (not produced in this process) for the runners."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"Artifact {path} does not exist.")
    return ExportResult(
        format=fmt, path=path, input_names=io_spec.input_names,
        output_names=io_spec.output_names,
        input_shapes=spec_shapes(io_spec.inputs, dynamic_batch),
        output_shapes=spec_shapes(io_spec.outputs, dynamic_batch),
        file_size_bytes=path_size(path), notes=["described from an existing file"])


def fspath(path: str | os.PathLike) -> Path:
    """``path`` as a Path."""
    return Path(os.fspath(path))
