"""A runner whose runtime runs on a device.

The :class:`~odconv_deploy.runners.Runner` contract over the device protocol, so validation
and benchmarks take it like any other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from odconv_deploy.devices.base import Device
from odconv_deploy.devices.cpu import describe_cpu
from odconv_deploy.devices.protocol import DeviceError, RunnerSession
from odconv_deploy.runners.base import Runner, TensorMeta

#: The runtime that runs each artifact suffix on a device.
RUNTIME_OF_SUFFIX = {".onnx": "onnxruntime", ".ort": "onnxruntime", ".pte": "executorch"}


class DeviceRunner(Runner):
    """Runs an ``.onnx``/``.ort`` or ``.pte`` artifact on a device.

    ONNX Runtime runs with all graph optimisations (a session's default), ExecuTorch with the
    XNNPACK delegate and the portable and optimized kernels.

    ``activate`` checks the device, stages the artifact there and starts the runner, which
    loads the model once; each ``infer`` is one request. A device that cannot be reached or
    lacks the runtime fails ``activate`` with the reason.

    Args:
        device: Where to run.
        path: The artifact (on this host).
        input_names, output_names: I/O names in order (a ``.pte`` carries none).
        input_shapes: Name -> shape; a string dim is flexible.
        threads: Runtime threads on the device.
        max_batch: Largest batch a ``.pte``'s memory plan holds (``None``: unbounded).
        name: Display name.
    """

    backend = "device"

    def __init__(self, device: Device, path: str | os.PathLike, *, input_names: Sequence[str],
                 output_names: Sequence[str], input_shapes: dict[str, Sequence[int | str]],
                 threads: int = 1, max_batch: int | None = None, name: str | None = None
                 ) -> None:
        self.path = Path(path)
        suffix = self.path.suffix
        if suffix not in RUNTIME_OF_SUFFIX:
            raise DeviceError(f"{self.path.name}: no device runtime runs {suffix or 'this'} "
                              f"files; devices run {', '.join(RUNTIME_OF_SUFFIX)}.")
        self.runtime = RUNTIME_OF_SUFFIX[suffix]
        super().__init__(name=name or f"{self.runtime} @ {device.name}")
        self.device, self.threads, self.max_batch = device, threads, max_batch
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.input_shapes = {k: list(v) for k, v in input_shapes.items()}
        self.session: RunnerSession | None = None
        #: (feed, outputs) of every inference, to compare with the host afterwards.
        self.record: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        #: What the runner last reported (kept after deactivate), and the last failure.
        self.last_info: dict[str, object] = {}
        self.last_error: str | None = None

    @classmethod
    def from_export(cls, device: Device, result: object, **kwargs: object) -> DeviceRunner:
        """Build from an :class:`export.ExportResult`."""
        kwargs.setdefault("max_batch", result.details.get("max_batch_planned"))
        return cls(device, result.path, input_names=result.input_names,
                   output_names=result.output_names, input_shapes=result.input_shapes,
                   **kwargs)

    def accepts_batch(self, batch: int) -> bool:
        """Flexible batches are bounded by a ``.pte``'s memory plan."""
        return super().accepts_batch(batch) and (self.max_batch is None
                                                 or batch <= self.max_batch)

    def activate_impl(self) -> None:  # noqa: D102
        check = self.device.check()
        problem = None
        if not check.ok:
            problem = f"{self.device.name}: " + "; ".join(check.problems or ["no runtime there"])
        elif self.runtime in check.missing:
            problem = (f"{self.device.name}: missing runtime {self.runtime}: "
                       f"{check.missing[self.runtime]}")
        if problem:
            self.last_error = problem
            raise DeviceError(problem)
        try:
            model = self.device.stage(self.path)
            self.session = RunnerSession(
                self.device.runner_command(self.runtime, model, self.threads),
                where=f"{self.device.name} ({self.runtime}, {self.path.name})",
                cpu=self.device.cpu)
        except DeviceError as exc:
            self.last_error = str(exc)
            raise
        self.last_info = self.runtime_info

    def deactivate_impl(self) -> None:  # noqa: D102
        if self.session is not None:
            self.session.close()
        self.session = None

    @property
    def runtime_info(self) -> dict[str, object]:
        """What the runner reported on the device.

        Runtime, version, threads, and the CPU (model, kernel-deciding features) its process
        saw.
        """
        if self.session is None:
            return {}
        info = dict(self.session.info)
        info["cpu"] = describe_cpu(info.pop("cpuinfo", {}) or {})
        return info

    def get_input_metadata_impl(self) -> list[TensorMeta]:  # noqa: D102
        return [TensorMeta(n, tuple(None if isinstance(d, str) else d
                                    for d in self.input_shapes[n]), np.dtype(np.float32))
                for n in self.input_names]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: D102
        try:
            outputs = self.session.infer([feed[n] for n in self.input_names])
        except DeviceError as exc:
            self.last_error = str(exc)
            raise
        if len(outputs) != len(self.output_names):
            raise DeviceError(f"{self.name}: the runner returned {len(outputs)} outputs; the "
                              f"artifact declares {len(self.output_names)} "
                              f"({self.output_names}).")
        result = dict(zip(self.output_names, outputs, strict=True))
        self.record.append((feed, result))
        return result

    def benchmark(self, feed: dict[str, np.ndarray], *, warmup: int, runs: int
                  ) -> list[float]:
        """Latencies (ms) of ``runs`` inferences timed by the runner on the device."""
        self._require_active("benchmark")
        self._check_feed(feed)
        return self.session.bench([feed[n] for n in self.input_names], warmup=warmup,
                                  runs=runs)
