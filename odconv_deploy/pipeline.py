"""The main job: from a model to a deployment report (``odconv-deploy run``)."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import odconv_deploy
from odconv_deploy._atomic import atomic_output, check_writable
from odconv_deploy.layers.deploy import DEFAULT_STRATEGY
from odconv_deploy.model_source import load_zoo_model
from odconv_deploy.reparameterize import convert_model

#: float32 whole-model tolerance of train form vs deploy form (relative to max |logit|).
FP32_MODEL_RTOL = 1e-4


@dataclass
class PipelineOptions:
    """What ``run_pipeline`` does; the CLI maps its flags one to one."""

    model: str = "od_resnet18"
    kernel_num: int = 4
    checkpoint: str | None = None
    strategy: str = DEFAULT_STRATEGY
    out: str = "odconv_out"
    overwrite: bool = False
    quick: bool = False
    seed: int = 0


@dataclass
class StepResult:
    """One pipeline step: status is ``ok``, ``failed`` or ``skipped`` (with the reason)."""

    name: str
    status: str
    seconds: float
    detail: str
    data: dict[str, object] = field(default_factory=dict)


@dataclass
class PipelineReport:
    """Everything a run produced; ``ok`` is False when any step failed."""

    options: PipelineOptions
    steps: list[StepResult] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no step failed."""
        return all(s.status != "failed" for s in self.steps)

    def summary(self) -> str:
        """One line per step and a verdict."""
        lines = [f"[{s.status:>7}] {s.name}: {s.detail}" for s in self.steps]
        lines.append(f"{'OK' if self.ok else 'FAILED'}: report in {self.options.out}")
        return "\n".join(lines)

    def to_json(self) -> str:
        """The report as JSON."""
        return json.dumps({"options": asdict(self.options), "environment": self.environment,
                           "ok": self.ok, "steps": [asdict(s) for s in self.steps]},
                          indent=2, default=str)

    def to_markdown(self) -> str:
        """The report as Markdown."""
        o = self.options
        lines = [f"# odconv-deploy report: {o.model} (kernel_num={o.kernel_num})", "",
                 f"Verdict: **{'OK' if self.ok else 'FAILED'}**", "",
                 "| step | status | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail} |"
                  for s in self.steps]
        lines += ["", "## Environment", ""]
        lines += [f"- {k}: {v}" for k, v in self.environment.items()]
        return "\n".join(lines) + "\n"


def environment() -> dict[str, str]:
    """Machine and library versions stamped into reports."""
    return {"odconv_deploy": odconv_deploy.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or "unknown",
            "cpu_threads": str(torch.get_num_threads())}


def run_pipeline(options: PipelineOptions, *,
                 progress: Callable[[str], None] = lambda _: None) -> PipelineReport:
    """Run the main job and write ``report.md`` and ``report.json`` into ``options.out``.

    Steps run in order; a failed step is recorded (not raised) and the report is still
    written, so partial results survive.
    """
    out = Path(options.out)
    check_writable(out / "report.json", overwrite=options.overwrite)
    report = PipelineReport(options, environment=environment())

    def step(name: str, fn: Callable[[], tuple[str, str, dict[str, object]]]) -> None:
        progress(f"-> {name} ...")
        start = time.perf_counter()
        try:
            status, detail, data = fn()
        except Exception as exc:  # noqa: BLE001 - recorded in the report, never swallowed
            status, detail, data = "failed", f"{type(exc).__name__}: {exc}", {}
        report.steps.append(StepResult(name, status, time.perf_counter() - start, detail, data))
        progress(f"   [{status}] {detail}")

    state: dict[str, object] = {}

    def load() -> tuple[str, str, dict[str, object]]:
        loaded = load_zoo_model(options.model, checkpoint=options.checkpoint, seed=options.seed,
                                kernel_num=options.kernel_num)
        state["loaded"] = loaded
        return "ok", f"{options.model} kernel_num={options.kernel_num}, {loaded.weights}", {}

    def convert() -> tuple[str, str, dict[str, object]]:
        loaded = state["loaded"]
        result = convert_model(loaded.model, strategy=options.strategy)
        state["deploy"] = result.model
        worst = max(layer.max_abs_error for layer in result.layers)
        figures: dict[str, object] = {"layers": len(result.layers),
                                      "folded_batchnorms": result.folded_bn_count,
                                      "worst_layer_error_fp64": worst}
        size = 160 if options.quick else 224
        for batch in (1, 3):
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                ref, got = loaded.model(x), result.model(x)
            err = (ref - got).abs().max().item()
            figures[f"model_max_abs_error_fp32_batch{batch}"] = err
            if not err <= FP32_MODEL_RTOL * max(1.0, ref.abs().max().item()):
                return "failed", f"deploy form differs at batch {batch}: {err:.2e}", figures
        return "ok", (f"{len(result.layers)} layers -> '{options.strategy}', "
                      f"{result.folded_bn_count} BNs folded, worst layer error (fp64) "
                      f"{worst:.1e}, whole model (fp32) "
                      f"{figures['model_max_abs_error_fp32_batch3']:.1e}"), figures

    step("load", load)
    if report.ok:
        step("convert", convert)
    with atomic_output(out / "report.json", overwrite=True) as tmp:
        tmp.write_text(report.to_json())
    with atomic_output(out / "report.md", overwrite=True) as tmp:
        tmp.write_text(report.to_markdown())
    return report
