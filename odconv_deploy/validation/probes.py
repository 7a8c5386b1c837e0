"""A debug form of a deploy model: every ODConv layer's attentions and output as extra outputs.

Output-only comparison hides routing errors: a layer whose kernel attention is wrong can move
the logits by less than the fp32 tolerance. :class:`ProbedModel` returns, after the model's
own outputs, for every deploy-form ODConv layer in execution order its kernel, spatial,
channel and filter attentions (those the layer has) and its output (which includes a
BatchNorm the conversion folded into it). Exported like any model,
it makes a runtime report what it computed inside each layer, under names the export sets on
purpose (``probe_003_kernel``), which :attr:`ProbedModel.probes` maps back to layer names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from odconv_deploy.io_spec import IOSpec, TensorSpec
from odconv_deploy.layers.deploy import ODConv2dDeploy
from odconv_deploy.layers.odconv import Attentions
from odconv_deploy.outputs import flatten_outputs

#: What is recorded per layer, in output order (absent attentions are left out).
PROBE_KINDS = ("kernel", "spatial", "channel", "filter", "output")


@dataclass(frozen=True)
class Probe:
    """One extra output: which layer (execution order ``index``) and what it holds."""

    name: str
    layer: str
    index: int
    kind: str


class ProbedModel(nn.Module):
    """``model`` (deploy form) returning its outputs, then every ODConv layer's probes.

    The layers taken, their order and which attentions they have are read from one run on
    ``io_spec``'s sample input, so the export sees a fixed list of outputs.

    Args:
        model: A deploy-form model (any network whose ODConv layers are ``ODConv2dDeploy``);
            a copy is probed, ``model`` itself is left as it is.
        io_spec: Its I/O spec (the probes are appended to its outputs).

    Raises:
        ValueError: ``model`` has no deploy-form ODConv layer (nothing to probe), or one runs
            more than once per forward (its calls would share names).
    """

    def __init__(self, model: nn.Module, io_spec: IOSpec) -> None:
        super().__init__()
        self.zoo_name = getattr(model, "zoo_name", None) or type(model).__name__
        model = copy.deepcopy(model).eval()
        self.model = model
        self._layers = {name: m for name, m in model.named_modules()
                        if isinstance(m, ODConv2dDeploy)}
        if not self._layers:
            raise ValueError("The model has no deploy-form ODConv layer to probe. Note: pass "
                             "the converted model (convert_model(...).model).")
        self._record: list[tuple[str, str, torch.Tensor]] | None = None
        self._install()
        with torch.no_grad():
            _, recorded = self._run(io_spec.sample_inputs(1))
        order = list(dict.fromkeys(layer for layer, _, _ in recorded))
        if len({(layer, kind) for layer, kind, _ in recorded}) < len(recorded):
            twice = next(layer for layer in order
                         if sum(1 for n, k, _ in recorded if n == layer and k == "output") > 1)
            raise ValueError(f"ODConv layer {twice!r} runs more than once per forward, so its "
                             "probes cannot be named per call.")
        self.probes = [Probe(f"probe_{order.index(layer):03d}_{kind}", layer,
                             order.index(layer), kind) for layer, kind, _ in recorded]
        self.io_spec = replace(io_spec, outputs=io_spec.outputs + tuple(
            TensorSpec(p.name, (1, *t.shape[1:])) for p, (_, _, t) in zip(
                self.probes, recorded, strict=True)))

    @property
    def layer_names(self) -> list[str]:
        """The probed layers in execution order."""
        return list(dict.fromkeys(p.layer for p in self.probes))

    def _install(self) -> None:
        """Wrap each layer's ``attentions`` and hook its output to record them."""
        for name, layer in self._layers.items():
            layer.attentions = self._recording(name, layer.attentions)
            layer.register_forward_hook(self._output_hook(name))

    def _recording(self, name: str, attentions: Callable[[torch.Tensor], Attentions]
                   ) -> Callable[[torch.Tensor], Attentions]:
        def record(x: torch.Tensor) -> Attentions:
            att = attentions(x)
            if self._record is not None:
                for kind in PROBE_KINDS[:-1]:
                    value = getattr(att, kind)
                    if value is not None:
                        self._record.append((name, kind, value.reshape(value.shape[0], -1)))
            return att
        return record

    def _output_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            if self._record is not None:
                self._record.append((name, "output", output))
        return hook

    def _run(self, inputs: tuple[torch.Tensor, ...]
             ) -> tuple[list[torch.Tensor], list[tuple[str, str, torch.Tensor]]]:
        self._record = []
        try:
            outputs = [t for _, t in flatten_outputs(self.model(*inputs))]
            return outputs, self._record
        finally:
            self._record = None

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The model's outputs, then the probes in :attr:`probes` order."""
        outputs, recorded = self._run(inputs)
        return (*outputs, *(t for _, _, t in recorded))
