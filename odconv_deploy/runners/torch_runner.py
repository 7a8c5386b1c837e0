"""PyTorch eager runner (train form or deploy form)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from odconv_deploy.errors import InputShapeError
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.outputs import flatten_outputs
from odconv_deploy.runners.base import Runner, TensorMeta


class TorchRunner(Runner):
    """Runs an ``nn.Module`` in eval mode under ``torch.no_grad``.

    Args:
        model: The module.
        io_spec: Its I/O names (default: ``model.io_spec``).
        threads: ``torch.set_num_threads`` while active (restored afterwards).
        name: Display name.
    """

    backend = "torch"

    def __init__(self, model: nn.Module, io_spec: IOSpec | None = None, *,
                 threads: int | None = None, name: str | None = None) -> None:
        super().__init__(name=name)
        self.model = model
        self.io_spec = io_spec or model.io_spec
        self.threads = threads
        self._saved_threads: int | None = None

    def activate_impl(self) -> None:  # noqa: D102
        self.model.eval()
        if self.threads:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def deactivate_impl(self) -> None:  # noqa: D102
        if self._saved_threads:
            torch.set_num_threads(self._saved_threads)

    def get_input_metadata_impl(self) -> list[TensorMeta]:  # noqa: D102
        return [TensorMeta(t.name, (None,) + tuple(t.shape[1:]), np.dtype(np.float32))
                for t in self.io_spec.inputs]

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: D102
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.io_spec.input_names]
        with torch.no_grad():
            out = self.model(*args)
        outs = [t for _, t in flatten_outputs(out)]
        if len(outs) != len(self.io_spec.outputs):
            raise InputShapeError(
                f"{self.name}: the model returned {len(outs)} tensors; its I/O spec declares "
                f"{self.io_spec.output_names}. Note: build the spec from the model "
                "(odconv_deploy.model_source.describe_io) or pass input_shape instead.")
        return {name: o.detach().cpu().numpy()
                for name, o in zip(self.io_spec.output_names, outs, strict=True)}
