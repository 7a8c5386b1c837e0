"""Benchmark an ODConv model beside its static twin across backends, batches and threads."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from export import ExportFormat, ExportResult, export_formats
from odconv_deploy.complexity import measure_complexity
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.model_source import LoadedModel, load_zoo_model, static_twin_of
from odconv_deploy.reparameterize import convert_model, find_odconv_layers
from odconv_deploy.runners.coreml_runner import BackendUnavailableError
from runtime_bench.backends import Backend, parse_backends
from runtime_bench.measure import MeasureSettings, interleaved, measure
from runtime_bench.probe import MachineProbe, machine_info, probe_machine
from runtime_bench.stats import paired_ratio


@dataclass
class BenchConfig:
    """What to measure. ``backends`` is a comma-separated list (see ``BACKENDS``)."""

    model: str = "od_resnet18"
    kernel_num: int = 4
    checkpoint: str | None = None
    backends: str = "ort,pte"
    batches: Sequence[int] = (1,)
    threads: Sequence[int] = (1,)
    strategy: str = "im2col"  # or "auto": chosen per layer for each backend's format
    #: Export artifacts with a symbolic batch; False bakes in the first of ``batches`` (other
    #: batch sizes are skipped; a size other than 1 is made for ONNX and ORT only).
    dynamic_batch: bool = True
    resolution: int | None = None  # default: the model's own input size
    settings: MeasureSettings = field(default_factory=MeasureSettings)
    out: str = "bench_out"
    overwrite: bool = False
    #: Artifacts of the ODConv model already exported (e.g. by the pipeline) to reuse; the
    #: formats missing here are exported.
    reuse_artifacts: Sequence[ExportResult] = ()


@dataclass
class BenchRow:
    """One (model, backend, batch, threads) measurement."""

    model: str
    role: str  # "odconv" or "static"
    backend: str
    batch: int
    threads: int
    resolution: int
    strategy: str | None
    status: str = "ok"  # ok | failed | skipped
    reason: str = ""
    latency: dict[str, float] = field(default_factory=dict)
    throughput_ips: float | None = None
    cold_start_s: float | None = None
    peak_rss_mb: float | None = None
    artifact_mb: float | None = None
    gmacs: float | None = None
    achieved_gflops: float | None = None
    pct_of_gemm_peak: float | None = None
    weight_mb: float | None = None
    floor_ms: float | None = None  # max(FLOPs / GEMM peak, weights / read bandwidth)
    ratio_to_static: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchReport:
    """All rows, plus the machine, versions, probes and settings they were measured with."""

    config: BenchConfig
    machine: dict[str, str]
    probes: dict[int, MachineProbe]
    rows: list[BenchRow] = field(default_factory=list)
    artifacts: list[dict[str, object]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return {"config": asdict(self.config), "machine": self.machine,
                "probes": {str(k): v.to_dict() for k, v in self.probes.items()},
                "rows": [asdict(r) for r in self.rows], "artifacts": self.artifacts}


def _prepare(loaded: LoadedModel, config: BenchConfig, spec: IOSpec, formats: set[ExportFormat],
             out: Path, progress: Callable[[str], None], reuse: Sequence[ExportResult] = ()
             ) -> tuple[nn.Module, dict[ExportFormat, ExportResult]]:
    model, strategy = loaded.model, config.strategy
    if find_odconv_layers(model):  # the eager model the torch backend runs
        model = convert_model(model, strategy=strategy, target="torch").model
    have = {r.format: r for r in reuse if r.ok and r.format in formats}
    missing = formats - set(have)
    if ExportFormat.ORT in missing:
        missing.add(ExportFormat.ONNX_SIMPLIFIED)
    if not missing:
        return model, have
    batch_size = 1 if config.dynamic_batch else config.batches[0]
    batch = "" if config.dynamic_batch else f"_b{batch_size}"
    results = export_formats(loaded.model, out, sorted(missing, key=lambda f: f.value),
                             stem=f"{loaded.name}_{strategy}{batch}", io_spec=spec,
                             strategy=strategy, converted=model,
                             dynamic_batch=config.dynamic_batch, batch_size=batch_size,
                             onnx_target="ort",  # only ONNX Runtime on this machine runs them
                             overwrite=config.overwrite, progress=progress)
    return model, {**{r.format: r for r in results}, **have}


def _fill_figures(row: BenchRow, macs: int, weight_bytes: int, probe: MachineProbe) -> None:
    median_s = row.latency["median_ms"] / 1e3
    row.gmacs = macs * row.batch / 1e9
    row.achieved_gflops = 2 * row.gmacs / median_s
    row.pct_of_gemm_peak = 100 * row.achieved_gflops / probe.sgemm_gflops
    row.weight_mb = weight_bytes / 1e6
    row.floor_ms = 1e3 * max(2 * row.gmacs / probe.sgemm_gflops,
                             weight_bytes / 1e9 / probe.read_gbps)
    row.throughput_ips = row.batch / median_s


def run_benchmark(config: BenchConfig, *, progress: Callable[[str], None] = lambda _: None
                  ) -> BenchReport:
    """Measure the ODConv model and its static twin on every backend, batch and thread count.

    Each (backend, batch, threads) cell measures both models separately (cold start, warm
    latency, memory), then runs them in interleaved A/B rounds for the ratio. A cell that
    fails is recorded with its reason and the sweep goes on.
    """
    backends: list[Backend] = parse_backends(config.backends)
    out = Path(config.out)
    loaded = load_zoo_model(config.model, checkpoint=config.checkpoint,
                            **({} if config.model == "od_tinynet_digits"
                               else {"kernel_num": config.kernel_num}))
    twin = static_twin_of(loaded)
    size = config.resolution or loaded.io_spec.inputs[0].shape[-1]
    spec = loaded.io_spec.with_input_size(size, size)
    report = BenchReport(config, machine_info(),
                         {t: probe_machine(t) for t in sorted(set(config.threads))})
    formats = {b.artifact for b in backends if b.artifact is not None}
    prepared = {}
    for role, item in (("odconv", loaded), ("static", twin)):
        progress(f"prepare {item.name} ({', '.join(sorted(f.value for f in formats)) or 'torch'})")
        reuse = config.reuse_artifacts if role == "odconv" and size == loaded.io_spec.inputs[
            0].shape[-1] else ()
        model, artifacts = _prepare(item, config, spec, set(formats), out / "artifacts",
                                    progress, reuse)
        complexity = measure_complexity(model, spec.inputs[0].with_batch(1))
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        prepared[role] = (item, model, artifacts, complexity.macs, weight_bytes)
        report.artifacts += [a.to_dict() for a in artifacts.values()]
    cells = [(b, n, t) for b in backends for n in config.batches for t in config.threads]
    for i, (backend, batch, threads) in enumerate(cells, 1):
        progress(f"[{i}/{len(cells)}] {backend.name} batch={batch} threads={threads}")
        rows, runners = {}, {}
        feed = {t.name: x.numpy() for t, x in zip(spec.inputs, spec.sample_inputs(batch),
                                                   strict=True)}
        for role, (item, model, artifacts, macs, weight_bytes) in prepared.items():
            row = BenchRow(item.name, role, backend.name, batch, threads, size,
                           config.strategy if role == "odconv" else None)
            rows[role] = row
            report.rows.append(row)
            artifact = artifacts.get(backend.artifact) if backend.artifact else None
            if backend.artifact and (artifact is None or not artifact.ok):
                row.status, row.reason = "failed", (artifact.error if artifact
                                                    else "artifact missing")
                continue
            make = functools.partial(backend.make, model, spec, artifact, threads)
            try:
                probe_runner = make()
                probe_runner.activate()
                accepted = probe_runner.accepts_batch(batch)
                probe_runner.deactivate()
                if not accepted:
                    row.status, row.reason = "skipped", f"the artifact does not take batch {batch}"
                    continue
                m = measure(make, feed, config.settings)
            except BackendUnavailableError as exc:
                row.status, row.reason = "skipped", str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on
                row.status, row.reason = "failed", f"{type(exc).__name__}: {exc}"[:500]
                continue
            row.latency, row.cold_start_s, row.peak_rss_mb = (m.stats.to_dict(), m.cold_start_s,
                                                              m.peak_rss_mb)
            row.artifact_mb = artifact.file_size_bytes / 1e6 if artifact else None
            _fill_figures(row, macs, weight_bytes, report.probes[threads])
            runners[role] = make
        if len(runners) == 2:
            a, b = interleaved(runners["odconv"](), runners["static"](), feed, feed,
                               config.settings)
            rows["odconv"].ratio_to_static = paired_ratio(a, b)
    return report
