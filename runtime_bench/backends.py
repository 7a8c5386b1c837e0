"""Benchmark backends: which artifact each needs and how to build its runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from export import ExportFormat, ExportResult
from export.formats import FORMATS, FormatInfo
from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.runners import Runner, TorchRunner


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


def _artifact_backend(info: FormatInfo) -> Backend:
    def make(model: nn.Module, spec: IOSpec, artifact: ExportResult, threads: int) -> Runner:
        return info.bench_runner(artifact, threads)
    return Backend(info.bench_backend, info.format, info.description, make)


#: PyTorch eager, then one backend per format that the format table benchmarks.
BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("torch", None, "PyTorch eager (deploy form)", _torch),
    *(_artifact_backend(info) for info in FORMATS.values() if info.bench_backend),
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
