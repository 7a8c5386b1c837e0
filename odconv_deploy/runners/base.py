"""The runner contract shared by validation and benchmarks (after Polygraphy's runners).

A runner wraps one way of executing a model: ``activate()`` does the expensive work (load,
compile), ``infer(feed)`` runs one batch and records ``last_inference_time``,
``deactivate()`` frees it. Runners are context managers. A new backend overrides the
``*_impl`` methods only.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from odconv_deploy.errors import InputShapeError, ODConvDeployError


class RunnerError(ODConvDeployError, RuntimeError):
    """A runner used out of order, or a backend that cannot run here."""


@dataclass(frozen=True)
class TensorMeta:
    """An input the runner accepts: name, shape (``None`` for a flexible axis), dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    @property
    def flexible_batch(self) -> bool:
        """Whether the batch axis (axis 0) accepts any size."""
        return bool(self.shape) and self.shape[0] is None


class Runner(abc.ABC):
    """Base class of every backend runner."""

    #: Short backend name, e.g. ``"onnxruntime"``.
    backend: str = ""

    def __init__(self, *, name: str | None = None) -> None:
        self.name = name or self.backend
        self.is_active = False
        self.last_inference_time: float | None = None
        self._metadata: list[TensorMeta] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def activate(self) -> None:
        """Load and prepare the model (idempotent)."""
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        """Release what :meth:`activate` acquired (idempotent)."""
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False
            self._metadata = None

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.deactivate()

    # -- inference ---------------------------------------------------------------------------
    def input_metadata(self) -> list[TensorMeta]:
        """Inputs the activated model takes."""
        self._require_active("input_metadata")
        if self._metadata is None:
            self._metadata = self.get_input_metadata_impl()
        return self._metadata

    def accepts_batch(self, batch: int) -> bool:
        """Whether every input takes batch size ``batch``."""
        return all(m.flexible_batch or (m.shape and m.shape[0] == batch)
                   for m in self.input_metadata())

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns output name -> array. Sets ``last_inference_time`` (s).

        Raises:
            InputShapeError: Missing/unknown input names, or shapes the model cannot take.
        """
        self._require_active("infer")
        self._check_feed(feed)
        start = time.perf_counter()
        outputs = self.infer_impl(feed)
        self.last_inference_time = time.perf_counter() - start
        return outputs

    def _check_feed(self, feed: dict[str, np.ndarray]) -> None:
        metadata = self.input_metadata()
        expected = [m.name for m in metadata]
        if sorted(feed) != sorted(expected):
            raise InputShapeError(
                f"{self.name}: received inputs {sorted(feed)}; expected {expected}.")
        for meta in metadata:
            shape = tuple(feed[meta.name].shape)
            ok = len(shape) == len(meta.shape) and all(
                want is None or want == got for want, got in zip(meta.shape, shape, strict=True))
            if not ok:
                wanted = tuple("?" if d is None else d for d in meta.shape)
                raise InputShapeError(
                    f"{self.name}: input {meta.name!r} received shape {shape}; the model "
                    f"accepts {wanted} ('?' = any size).")

    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise RunnerError(f"{self.name}: call activate() (or use 'with runner:') before "
                              f"{what}().")

    # -- backend hooks -----------------------------------------------------------------------
    @abc.abstractmethod
    def activate_impl(self) -> None:
        """Load the model."""

    @abc.abstractmethod
    def get_input_metadata_impl(self) -> list[TensorMeta]:
        """Describe the inputs of the loaded model."""

    @abc.abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the loaded model."""

    def deactivate_impl(self) -> None:  # noqa: B027 - optional hook
        """Free the loaded model (default: drop nothing)."""
