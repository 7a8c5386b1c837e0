"""ONNX Runtime runner for ``.onnx`` and ``.ort`` models (CPU execution provider)."""

from __future__ import annotations

import os

import numpy as np

from odconv_deploy.errors import require_backend
from odconv_deploy.layers.ort_nchwc import BLOCK_METADATA_KEY, ort_nchwc_block
from odconv_deploy.runners.base import Runner, RunnerError, TensorMeta

#: Graph optimisation levels by name.
OPTIMIZATION_LEVELS = ("off", "basic", "extended", "full")


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX or ORT-format model with ONNX Runtime.

    Args:
        path: ``.onnx`` or ``.ort`` file.
        optimization: Graph optimisations: ``off``, ``basic``, ``extended`` or ``full``.
        threads: Intra-op threads (``None``: ONNX Runtime's default).
        spin: Whether idle intra-op threads spin-wait for work (ONNX Runtime's default). Off,
            two sessions that take turns on a small machine do not steal each other's cores.
        name: Display name.
    """

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, *, optimization: str = "full",
                 threads: int | None = None, spin: bool = True, name: str | None = None
                 ) -> None:
        super().__init__(name=name)
        if optimization not in OPTIMIZATION_LEVELS:
            raise RunnerError(f"Unknown optimization level {optimization!r}; expected one of "
                              f"{OPTIMIZATION_LEVELS}.")
        self.path = os.fspath(path)
        self.optimization = optimization
        self.threads = threads
        self.spin = spin
        self.session = None

    def activate_impl(self) -> None:  # noqa: D102
        ort = require_backend("onnxruntime", extra="onnx", purpose="The ONNX Runtime runner")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "full": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if not self.spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(self.path, opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise RunnerError(f"{self.name}: ONNX Runtime cannot load {self.path}: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        self._check_nchwc_block()

    def _check_nchwc_block(self) -> None:
        """Refuse a graph laid out for another CPU's NCHWc block (``ort_nchwc`` layers)."""
        wanted = self.session.get_modelmeta().custom_metadata_map.get(BLOCK_METADATA_KEY)
        if wanted is None:
            return
        here = ort_nchwc_block()
        if wanted != str(here):
            self.session = None
            raise RunnerError(
                f"{self.name}: {self.path} was exported for ONNX Runtime's NCHWc block "
                f"{wanted} (ort_nchwc layers); this machine's onnxruntime "
                f"{'has no NCHWc kernels' if here is None else f'uses block {here}'}. Note: "
                "re-export it on this kind of CPU, or export with target 'onnx' (portable).")

    def deactivate_impl(self) -> None:  # noqa: D102
        self.session = None

    def get_input_metadata_impl(self) -> list[TensorMeta]:  # noqa: D102
        return [TensorMeta(i.name, tuple(d if isinstance(d, int) else None for d in i.shape),
                           np.dtype(np.float32)) for i in self.session.get_inputs()]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: D102
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed), strict=True))
