"""Quantization drift: how far a quantized model computes from the float32 one.

Validation checks that an artifact computes what its PyTorch reference computes; for an
``int8w`` artifact the reference is the quantized model, so that check stays exact. What the
quantization itself costs is measured here, apart: per output the SQNR, relative error and
top-1 agreement against float32, and per ODConv layer how often the kernel attention picks the
same kernel (argmax) as in float32. On seeded inputs these are figures about the numerics, not
accuracy; accuracy needs labelled data (the trained digits models' test set).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from odconv_deploy.layers.deploy import ODConv2dDeploy
from odconv_deploy.runners.base import Runner
from odconv_deploy.tables import markdown_table
from odconv_deploy.validation.compare import Tolerance, compare_output

#: compare_output needs a tolerance; drift is reported, never judged.
_NO_VERDICT = Tolerance(rtol=math.inf, atol=math.inf, min_cosine=-math.inf)


@dataclass
class OutputDrift:
    """One output of the quantized model against float32, over every sample fed."""

    output: str
    samples: int
    sqnr_db: float
    max_rel: float
    cosine: float
    top1_agreement: float | None


@dataclass
class KernelChoice:
    """How often one ODConv layer's kernel attention picks the float32 model's kernel."""

    layer: str
    samples: int
    agreement: float


@dataclass
class DriftReport:
    """The drift of a quantized model from the float32 model on the feeds given."""

    precision: str
    inputs: str
    outputs: list[OutputDrift] = field(default_factory=list)
    kernel_choices: list[KernelChoice] = field(default_factory=list)

    @property
    def worst_kernel_agreement(self) -> float | None:
        """The lowest per-layer kernel-choice agreement (None without kernel attention)."""
        return min((c.agreement for c in self.kernel_choices), default=None)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return {"precision": self.precision, "inputs": self.inputs,
                "outputs": [asdict(o) for o in self.outputs],
                "kernel_choices": [asdict(c) for c in self.kernel_choices]}

    def to_markdown(self) -> str:
        """The output table, then the kernel choices (every layer below 1, else one line)."""
        lines = [f"{self.precision} against float32 PyTorch on {self.inputs}:", "",
                 *markdown_table(
                     ["output", "samples", "SQNR dB", "max rel", "cosine", "top-1 agreement"],
                     [(o.output, o.samples, f"{o.sqnr_db:.1f}", f"{o.max_rel:.2e}",
                       f"{o.cosine:.6f}",
                       "-" if o.top1_agreement is None else f"{o.top1_agreement:.4f}")
                      for o in self.outputs])]
        if self.kernel_choices:
            changed = [c for c in self.kernel_choices if c.agreement < 1.0]
            lines += ["", f"Kernel choice (argmax of the kernel attention) agrees with float32 "
                          f"on every sample in {len(self.kernel_choices) - len(changed)} of "
                          f"{len(self.kernel_choices)} ODConv layers."]
            if changed:
                lines += ["", *markdown_table(
                    ["layer", "samples", "kernel-choice agreement"],
                    [(c.layer, c.samples, f"{c.agreement:.4f}") for c in changed])]
        return "\n".join(lines) + "\n"


def _kernel_choices(model: nn.Module, store: dict[str, list[torch.Tensor]]) -> list[object]:
    """Hooks that append each ODConv layer's argmax kernel per sample to ``store``."""
    def hook(name: str) -> Callable[..., None]:
        def record(module: ODConv2dDeploy, args: tuple[torch.Tensor, ...], _: object) -> None:
            kernel = module.attentions(args[0]).kernel
            if kernel is not None:
                store.setdefault(name, []).append(kernel.argmax(dim=1))
        return record
    return [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
            if isinstance(m, ODConv2dDeploy)]


def _run(model: nn.Module, feeds: list[Mapping[str, np.ndarray]], names: list[str]
         ) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """Outputs (concatenated over feeds) and per-layer kernel choices of ``model``."""
    choices: dict[str, list[torch.Tensor]] = {}
    handles = _kernel_choices(model, choices)
    outputs: dict[str, list[np.ndarray]] = {}
    try:
        with torch.no_grad():
            for feed in feeds:
                result = model(*(torch.from_numpy(np.asarray(v)) for v in feed.values()))
                result = result if isinstance(result, (tuple, list)) else (result,)
                for name, value in zip(names, result, strict=True):
                    outputs.setdefault(name, []).append(value.numpy())
    finally:
        for handle in handles:
            handle.remove()
    return ({n: np.concatenate(v) for n, v in outputs.items()},
            {n: torch.cat(v) for n, v in choices.items()})


def _run_artifact(runner: Runner, feeds: list[Mapping[str, np.ndarray]], names: list[str]
                  ) -> dict[str, np.ndarray]:
    """Outputs of an artifact's runner, concatenated over feeds (by output order)."""
    outputs: dict[str, list[np.ndarray]] = {}
    with runner:
        for feed in feeds:
            got = list(runner.infer(dict(feed)).values())
            for name, value in zip(names, got, strict=True):
                outputs.setdefault(name, []).append(np.asarray(value))
    return {n: np.concatenate(v) for n, v in outputs.items()}


def quantization_drift(reference: nn.Module, quantized: nn.Module | Runner,
                       feeds: list[Mapping[str, np.ndarray]], output_names: list[str], *,
                       precision: str, inputs: str, classifier: bool = False) -> DriftReport:
    """Measure ``quantized`` against the float32 ``reference`` on ``feeds``.

    Args:
        reference: The float32 model (train or deploy form; its ODConv deploy layers, if any,
            give the kernel choices).
        quantized: The quantized deploy model, or the runner of a quantized artifact (then
            outputs only: its kernel attention is not observable).
        feeds: Input dicts (in the models' input order), batches of any size.
        output_names: Names of the models' outputs, in order.
        precision: The quantized model's precision, for the report.
        inputs: What the feeds are ("seeded inputs", "the digits test set", ...).
        classifier: Report top-1 agreement (2-D logits).
    """
    ref_out, ref_choice = _run(reference, feeds, output_names)
    if isinstance(quantized, nn.Module):
        q_out, q_choice = _run(quantized, feeds, output_names)
    else:
        q_out, q_choice = _run_artifact(quantized, feeds, output_names), {}
    report = DriftReport(precision, inputs)
    for name in output_names:
        figures = compare_output(name, ref_out[name], q_out[name], _NO_VERDICT,
                                 classifier=classifier)
        report.outputs.append(OutputDrift(name, len(ref_out[name]), figures.sqnr_db,
                                          figures.max_rel, figures.cosine,
                                          figures.top1_agreement))
    for layer, chosen in q_choice.items():
        if layer in ref_choice:
            report.kernel_choices.append(KernelChoice(
                layer, len(chosen), float((chosen == ref_choice[layer]).double().mean())))
    return report
