"""What the benchmark times: formats (each run by its runtime) and PyTorch eager (``torch``).

A benchmarked format is named as in ``--formats`` of every command (``onnx-sim``, ``ort``,
``coreml``, ``pte``); the format table (:mod:`export.formats`) says which runtime runs it and
how its runner is built. ``torch`` times the deploy-form PyTorch module itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from export import ExportFormat, ExportResult
from export.formats import FORMATS, FormatInfo
from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.runners import Runner, TorchRunner


class UnknownBenchFormatError(ODConvDeployError, ValueError):
    """A name the benchmark cannot time."""


@dataclass(frozen=True)
class BenchFormat:
    """One thing the benchmark times: the artifact it needs and its runner factory."""

    name: str
    artifact: ExportFormat | None  # None: runs the PyTorch module itself
    description: str
    make: Callable[..., Runner]


def _torch(model: nn.Module, spec: IOSpec, artifact: ExportResult | None, threads: int
           ) -> Runner:
    return TorchRunner(model, spec, threads=threads, name="torch")


def _artifact_format(info: FormatInfo) -> BenchFormat:
    def make(model: nn.Module, spec: IOSpec, artifact: ExportResult, threads: int) -> Runner:
        return info.bench_runner(artifact, threads)
    return BenchFormat(info.name, info.format, info.description, make)


#: PyTorch eager, then every format the format table gives a benchmark runner.
BENCH_FORMATS: dict[str, BenchFormat] = {b.name: b for b in (
    BenchFormat("torch", None, "PyTorch eager (deploy form)", _torch),
    *(_artifact_format(info) for info in FORMATS.values() if info.bench_runner),
)}
#: ``--backends`` names of 0.1 and the format each timed: ``ort`` ran the simplified ONNX,
#: ``ort-format`` the ``.ort`` file (the others were already format names).
DEPRECATED_BACKENDS = {"ort": "onnx-sim", "ort-format": "ort"}


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def renamed_backends(text: str) -> str:
    """A 0.1 ``--backends`` list in today's ``--formats`` names."""
    return ",".join(DEPRECATED_BACKENDS.get(n, n) for n in _names(text))


def parse_bench_formats(text: str) -> list[BenchFormat]:
    """``"onnx-sim,pte"`` -> what to time, with a clear error on an unknown name."""
    names = _names(text)
    unknown = [n for n in names if n not in BENCH_FORMATS]
    if unknown or not names:
        raise UnknownBenchFormatError(
            f"Cannot benchmark {unknown or '(nothing given)'}. Note: choose from "
            f"{', '.join(BENCH_FORMATS)} (onnx is timed as onnx-sim, its simplified graph).")
    return [BENCH_FORMATS[n] for n in names]
