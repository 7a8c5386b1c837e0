"""CoreML runners: real ``predict`` on macOS, and the MIL reference executor anywhere."""

from __future__ import annotations

import os
import sys

import numpy as np

from odconv_deploy.errors import require_backend
from odconv_deploy.runners.base import Runner, RunnerError, TensorMeta

COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU",
                 "cpu_and_ne": "CPU_AND_NE"}


class BackendUnavailableError(RunnerError):
    """The backend cannot run on this machine (e.g. CoreML predict off macOS)."""


def coreml_predict_available() -> tuple[bool, str]:
    """Whether CoreML ``predict`` can run here, and why not."""
    if sys.platform != "darwin":
        return False, ("CoreML predict needs macOS (coremltools' Linux wheels have no "
                       "libcoremlpython); the MIL reference executor checks the numbers here")
    return True, ""


class CoreMLRunner(Runner):
    """Runs an ``.mlpackage`` with Core ML's ``predict`` (macOS only).

    Args:
        path: ``.mlpackage`` folder.
        compute_units: ``all``, ``cpu_only``, ``cpu_and_gpu`` or ``cpu_and_ne``.
        name: Display name.
    """

    backend = "coreml"

    def __init__(self, path: str | os.PathLike, *, compute_units: str = "all",
                 name: str | None = None) -> None:
        super().__init__(name=name or f"coreml[{compute_units}]")
        if compute_units not in COMPUTE_UNITS:
            raise RunnerError(f"Unknown compute_units {compute_units!r}; expected one of "
                              f"{sorted(COMPUTE_UNITS)}.")
        self.path = os.fspath(path)
        self.compute_units = compute_units
        self.model = None

    def activate_impl(self) -> None:  # noqa: D102
        ok, why = coreml_predict_available()
        if not ok:
            raise BackendUnavailableError(f"{why}.")
        ct = require_backend("coremltools", extra="coreml", purpose="The CoreML runner")
        units = getattr(ct.ComputeUnit, COMPUTE_UNITS[self.compute_units])
        self.model = ct.models.MLModel(self.path, compute_units=units)

    def get_input_metadata_impl(self) -> list[TensorMeta]:  # noqa: D102
        return _spec_inputs(self.model.get_spec())

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: D102
        out = self.model.predict({k: np.ascontiguousarray(v) for k, v in feed.items()})
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def _spec_inputs(spec: object) -> list[TensorMeta]:
    metas = []
    for inp in spec.description.input:
        array = inp.type.multiArrayType
        ranges = list(array.shapeRange.sizeRanges)
        if ranges:
            shape = tuple(r.lowerBound if r.lowerBound == r.upperBound else None for r in ranges)
        else:
            shape = tuple(array.shape)
        metas.append(TensorMeta(inp.name, shape, np.dtype(np.float32)))
    return metas


class MILReferenceRunner(Runner):
    """Executes a converted CoreML program op by op in NumPy (works on Linux).

    Args:
        source: ``.mlpackage`` path or an in-memory ``MLModel``.
        name: Display name.
        rounding: The executor's fp16 model: ``"per_op"`` (optimistic), ``"per_term"``
            (fp16 accumulation, pessimistic) or ``"none"``.
    """

    backend = "coreml-mil-reference"

    def __init__(self, source: str | os.PathLike | object, *, name: str | None = None,
                 rounding: str = "per_op") -> None:
        super().__init__(name=name)
        self.source = os.fspath(source) if isinstance(source, (str, os.PathLike)) else source
        self.rounding = rounding
        self.executor = None
        self._spec = None

    def activate_impl(self) -> None:  # noqa: D102
        ct = require_backend("coremltools", extra="coreml", purpose="The MIL reference runner")
        from odconv_deploy.runners.mil import MILExecutor, load_mil_program

        model = (ct.models.MLModel(self.source, skip_model_load=True)
                 if isinstance(self.source, str) else self.source)
        self._spec = model.get_spec()
        self.executor = MILExecutor(load_mil_program(self.source), rounding=self.rounding)
        self.executor.check_supported()

    def deactivate_impl(self) -> None:  # noqa: D102
        self.executor = None

    def get_input_metadata_impl(self) -> list[TensorMeta]:  # noqa: D102
        return _spec_inputs(self._spec)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: D102
        out = self.executor.run({k: np.asarray(v, dtype=np.float32) for k, v in feed.items()})
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
