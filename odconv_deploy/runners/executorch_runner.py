"""ExecuTorch runner for ``.pte`` programs (XNNPACK-delegated or portable)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from odconv_deploy.errors import require_backend
from odconv_deploy.runners.base import Runner, RunnerError, TensorMeta


class ExecuTorchRunner(Runner):
    """Runs the ``forward`` method of a ``.pte`` program with the ExecuTorch runtime.

    A ``.pte`` file carries no tensor names, so they (and which axes are flexible) come from
    the export: use :meth:`from_export` or pass them.

    Args:
        path: ``.pte`` file.
        input_names: Input names in call order.
        input_shapes: Name -> shape; a string dim (e.g. ``"batch"``) is flexible.
        output_names: Output names in return order.
        threads: XNNPACK threadpool size (process-wide in ExecuTorch; set while active).
        max_batch: Largest batch the program's memory plan holds (``None``: unbounded).
        name: Display name.
    """

    backend = "executorch"

    def __init__(self, path: str | os.PathLike, *, input_names: Sequence[str],
                 input_shapes: dict[str, Sequence[int | str]], output_names: Sequence[str],
                 threads: int | None = None, max_batch: int | None = None,
                 name: str | None = None) -> None:
        super().__init__(name=name)
        self.max_batch = max_batch
        self.path = os.fspath(path)
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.input_shapes = {k: list(v) for k, v in input_shapes.items()}
        self.threads = threads
        self._method = None

    @classmethod
    def from_export(cls, result: object, **kwargs: object) -> ExecuTorchRunner:
        """Build from an :class:`export.ExportResult` of :func:`export.export_executorch`."""
        kwargs.setdefault("max_batch", result.details.get("max_batch_planned"))
        return cls(result.path, input_names=result.input_names,
                   input_shapes=result.input_shapes, output_names=result.output_names, **kwargs)

    def accepts_batch(self, batch: int) -> bool:
        """Flexible batches are bounded by the program's memory plan."""
        return super().accepts_batch(batch) and (self.max_batch is None
                                                 or batch <= self.max_batch)

    def activate_impl(self) -> None:  # noqa: D102
        require_backend("executorch", extra="executorch", purpose="The ExecuTorch runner")
        from executorch.runtime import Runtime

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental API" warnings
            if self.threads:
                from executorch.extension.pybindings import portable_lib

                portable_lib._unsafe_reset_threadpool(self.threads)
            try:
                program = Runtime.get().load_program(self.path)
                self._method = program.load_method("forward")
            except Exception as exc:
                raise RunnerError(f"{self.name}: ExecuTorch cannot load {self.path}: "
                                  f"{type(exc).__name__}: {str(exc)[:300]}") from exc

    def deactivate_impl(self) -> None:  # noqa: D102
        self._method = None

    def get_input_metadata_impl(self) -> list[TensorMeta]:  # noqa: D102
        return [TensorMeta(n, tuple(None if isinstance(d, str) else d
                                    for d in self.input_shapes[n]), np.dtype(np.float32))
                for n in self.input_names]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: D102
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names]
        try:
            outs = self._method.execute(args)
        except RuntimeError as exc:
            raise RunnerError(f"{self.name}: ExecuTorch failed to run inputs "
                              f"{[tuple(a.shape) for a in args]}: {exc}") from exc
        return {n: o.numpy().copy() for n, o in zip(self.output_names, outs, strict=True)}
