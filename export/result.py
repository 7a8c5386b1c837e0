"""What an export produced: the result, the format enum, the error, and file helpers."""

from __future__ import annotations

import enum
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from odconv_deploy._version import package_versions
from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.io_spec import IOSpec, TensorSpec
from odconv_deploy.status import Status


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
        details: Format-specific figures (node counts before/after, delegation shares,
            ``size_split``: the bytes of the ODConv kernel banks found in the file, see
            :mod:`export.sizes`, ...).
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
        split = self.details.get("size_split")
        banks = (f" of which ODConv kernel banks {split['kernel_bank_bytes'] / 1e6:.1f} MB"
                 if split else "")
        return (f"{self.format.value:<9} {self.path}  ({self.file_size_bytes / 1e6:.1f} MB"
                f"{banks}{ops}, inputs {shapes})")


def tool_versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` plus odconv-deploy and torch (the one stamp)."""
    return package_versions(*packages)


def path_size(path: Path) -> int:
    """Bytes on disk of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


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
    notes = ["described from an existing file"]
    options: dict[str, object] = {}
    if fmt is ExportFormat.COREML:
        options["precision"] = _coreml_precision(path, notes)
    weights = recorded_weights(fmt, path)
    if weights is not None:
        options["weights"] = weights
    return ExportResult(
        format=fmt, path=path, input_names=io_spec.input_names,
        output_names=io_spec.output_names,
        input_shapes=spec_shapes(io_spec.inputs, dynamic_batch),
        output_shapes=spec_shapes(io_spec.outputs, dynamic_batch),
        file_size_bytes=path_size(path), options=options, notes=notes)


#: Suffix of the PyTorch reference saved beside an int8 ``.pte`` (:mod:`export.quantize_pt2e`).
PT2E_REFERENCE_SUFFIX = ".int8_reference.pt2"


def pt2e_reference_path(pte: str | os.PathLike) -> Path:
    """Where the PyTorch reference of an int8 ``.pte`` is saved."""
    pte = Path(pte)
    return pte.with_name(pte.name.removesuffix(".pte") + PT2E_REFERENCE_SUFFIX)


def recorded_weights(fmt: ExportFormat, path: str | os.PathLike) -> str | None:
    """The weight storage (``float`` / ``int8w`` / ``int8``) an artifact records.

    ONNX, ORT and Core ML: their metadata; a ``.pte``: ``int8`` when its int8 reference is
    beside it. None for files without the record (not made by this package).
    """
    if fmt is ExportFormat.EXECUTORCH:
        return "int8" if pt2e_reference_path(path).is_file() else None
    if fmt is ExportFormat.ORT:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.get_modelmeta().custom_metadata_map.get("weights")
    if fmt in (ExportFormat.ONNX, ExportFormat.ONNX_SIMPLIFIED):
        import onnx

        props = onnx.load(str(path), load_external_data=False).metadata_props
        return next((p.value for p in props if p.key == "weights"), None)
    if fmt is ExportFormat.COREML:
        from odconv_deploy.errors import require_backend

        ct = require_backend("coremltools", extra="coreml", purpose="Reading a Core ML artifact")
        return ct.utils.load_spec(str(path)).description.metadata.userDefined.get("weights")
    return None


def _coreml_precision(path: Path, notes: list[str]) -> str:
    """The precision an .mlpackage's metadata records (our exports write it), else fp16."""
    from odconv_deploy.errors import require_backend

    ct = require_backend("coremltools", extra="coreml", purpose="Reading a Core ML artifact")
    recorded = ct.utils.load_spec(str(path)).description.metadata.userDefined.get("precision")
    if recorded in ("fp16", "fp32"):
        return recorded
    notes.append("no precision in its metadata: checked as fp16 (the mlprogram default)")
    return "fp16"


def fspath(path: str | os.PathLike) -> Path:
    """``path`` as a Path."""
    return Path(os.fspath(path))
