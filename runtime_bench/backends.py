"""Benchmark backends: which artifact each needs and how to build its runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from export import ExportFormat, ExportResult
from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.runners import (
    CoreMLRunner,
    ExecuTorchRunner,
    OnnxRuntimeRunner,
    Runner,
    TorchRunner,
)


class UnknownBackendError(ODConvDeployError, ValueError):
    """A backend name the harness does not know."""


@dataclass(frozen=True)
class Backend:
    """A benchmark backend: the artifact format it runs and a runner factory."""

    name: str
    artifact: ExportFormat | None  # None: runs the PyTorch module itself
    description: str
    make: Callable[..., Runner]


def _torch(model: nn.Module, spec: IOSpec, artifact: ExportResult | None, threads: int
           ) -> Runner:
    return TorchRunner(model, spec, threads=threads, name="torch")


#: ONNX Runtime's idle pool threads spin by default; with several threads the benchmark turns
#: that off, for both models alike: in interleaved A/B rounds the idle session's spinning
#: threads otherwise steal the running one's cores (on this 2-core machine the ratio of
#: od_resnet18 k=1 read 1.18 with an IQR of 0.81-1.62 spinning, 1.25 (1.23-1.26) not).
def _ort(model: nn.Module, spec: IOSpec, artifact: ExportResult, threads: int) -> Runner:
    return OnnxRuntimeRunner(artifact.path, threads=threads, spin=threads <= 1, name="ort")


def _ort_format(model: nn.Module, spec: IOSpec, artifact: ExportResult, threads: int
                ) -> Runner:
    return OnnxRuntimeRunner(artifact.path, threads=threads, spin=threads <= 1,
                             name="ort-format")


def _pte(model: nn.Module, spec: IOSpec, artifact: ExportResult, threads: int) -> Runner:
    return ExecuTorchRunner.from_export(artifact, threads=threads, name="pte")


def _coreml(model: nn.Module, spec: IOSpec, artifact: ExportResult, threads: int) -> Runner:
    return CoreMLRunner(artifact.path, name="coreml")


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", None, "PyTorch eager (deploy form)", _torch),
    Backend("ort", ExportFormat.ONNX_SIMPLIFIED, "ONNX Runtime CPU on the simplified ONNX", _ort),
    Backend("ort-format", ExportFormat.ORT, "ONNX Runtime on the .ort (Mobile) model", _ort_format),
    Backend("pte", ExportFormat.EXECUTORCH, "ExecuTorch with XNNPACK", _pte),
    Backend("coreml", ExportFormat.COREML, "Core ML predict (macOS only)", _coreml),
)}


def parse_backends(text: str) -> list[Backend]:
    """``"ort,pte"`` -> backends, with a clear error on an unknown name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise UnknownBackendError(
            f"Unknown backend(s) {unknown or '(none given)'}. Note: choose from "
            f"{', '.join(BACKENDS)}.")
    return [BACKENDS[n] for n in names]
