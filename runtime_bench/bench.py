"""Benchmark an ODConv model beside its static twin across formats, batches and threads."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import nn

from export import ExportFormat, ExportResult, export_formats
from odconv_deploy.calibration import CalibrationSet
from odconv_deploy.complexity import measure_complexity
from odconv_deploy.conversions import Conversions
from odconv_deploy.devices import Device, DeviceRunner
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.model_source import LoadedModel, static_twin_of
from odconv_deploy.quantize import (
    quantize_conv_weights,
    stored_weight_bytes,
    stores_int8_banks,
)
from odconv_deploy.reparameterize import find_odconv_layers
from odconv_deploy.runners.coreml_runner import BackendUnavailableError
from odconv_deploy.status import Status
from runtime_bench.bench_formats import BenchFormat, parse_bench_formats
from runtime_bench.measure import MeasureSettings, interleaved, measure
from runtime_bench.probe import MachineProbe, machine_info, probe_machine
from runtime_bench.stats import paired_ratio, summarize

#: The artifacts a device runtime runs, among the benchmark's formats.
DEVICE_BENCH_FORMATS = (ExportFormat.ONNX_SIMPLIFIED, ExportFormat.ORT, ExportFormat.EXECUTORCH)


@dataclass
class BenchConfig:
    """How to measure. ``formats`` is a comma-separated list (see ``BENCH_FORMATS``)."""

    formats: str = "onnx-sim,pte"
    batches: Sequence[int] = (1,)
    threads: Sequence[int] = (1,)
    strategy: str = "im2col"  # or "auto": chosen per layer for each format
    #: Export artifacts with a symbolic batch; False bakes in the first of ``batches`` (other
    #: batch sizes are skipped; a size other than 1 is made for ONNX and ORT only).
    dynamic_batch: bool = True
    settings: MeasureSettings = field(default_factory=MeasureSettings)
    out: str = "bench_out"
    overwrite: bool = False


@dataclass
class BenchSubject:
    """One model to measure: the eager module ``torch`` times and its artifacts.

    Attributes:
        name: Model name in the rows.
        role: ``odconv`` or ``static`` (the twin the ratio is taken against).
        model: The deploy-form module (what ``torch`` times).
        artifacts: Exported artifacts by format (a failed export carries its reason).
        strategy: The strategy label of its rows (None for the static twin).
    """

    name: str
    role: str
    model: nn.Module
    artifacts: dict[ExportFormat, ExportResult]
    strategy: str | None = None


@dataclass
class BenchRow:
    """One (model, format, batch, threads[, device]) measurement.

    On a device the format reads ``FORMAT@DEVICE`` and the latency is the runner's own on the
    device (the transport is not in it).
    """

    model: str
    role: str  # "odconv" or "static"
    format: str  # a BENCH_FORMATS name
    batch: int
    threads: int
    resolution: int
    strategy: str | None
    status: Status = Status.OK
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
    device: str = "host"


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


def prepare_subjects(loaded: LoadedModel, config: BenchConfig, *,
                     conversions: Conversions | None = None,
                     reuse: Sequence[ExportResult] = (),
                     calibration: CalibrationSet | None = None, reduce_range: bool = False,
                     progress: Callable[[str], None] = lambda _: None) -> list[BenchSubject]:
    """The ODConv model and its static twin, with the artifacts the formats need.

    The ODConv model's conversions come from ``conversions`` (the run's, default a new one
    with ``config.strategy``); artifacts in ``reuse`` (already exported, e.g. by the pipeline)
    are taken as they are and only missing formats are exported, under ``config.out``.

    The twin is quantized the way the model is: in ``int8w`` and ``int8`` its convs that stand
    in for the ODConv layers store their weights int8 (computed in float, as the ODConv
    layers'); in ``int8`` both graphs' static convs and linears are quantized with the same
    ``calibration``.
    """
    formats = {b.artifact for b in parse_bench_formats(config.formats) if b.artifact is not None}
    twin = static_twin_of(loaded)
    precision = conversions.precision if conversions is not None else "fp32"
    if stores_int8_banks(precision):
        names = [name for name, _ in find_odconv_layers(loaded.model)]
        twin = replace(twin, model=quantize_conv_weights(twin.model, names),
                       name=f"{twin.name}_{precision}")
    subjects = []
    for role, item in (("odconv", loaded), ("static", twin)):
        convs = (conversions if role == "odconv" and conversions is not None
                 else Conversions(item.model, config.strategy,
                                  precision="int8" if precision == "int8" else "fp32"))
        have = {r.format: r for r in reuse if r.ok and r.format in formats} \
            if role == "odconv" else {}
        missing = sorted(formats - set(have), key=lambda f: f.value)
        progress(f"prepare {item.name} ({', '.join(f.value for f in missing) or 'torch'})")
        batch_size = 1 if config.dynamic_batch else config.batches[0]
        suffix = "" if config.dynamic_batch else f"_b{batch_size}"
        made = export_formats(item.model, Path(config.out) / "artifacts", missing,
                              stem=f"{item.name}_{config.strategy}{suffix}",
                              io_spec=item.io_spec, conversions=convs,
                              dynamic_batch=config.dynamic_batch, batch_size=batch_size,
                              # only ONNX Runtime on this machine runs them
                              onnx_target="onnxruntime", calibration=calibration,
                              reduce_range=reduce_range,
                              overwrite=config.overwrite, progress=progress) if missing else []
        subjects.append(BenchSubject(item.name, role, convs.get("torch").model,
                                     {**{r.format: r for r in made}, **have},
                                     config.strategy if role == "odconv" else None))
    return subjects


def _fill_figures(row: BenchRow, macs: int, weight_bytes: int, probe: MachineProbe) -> None:
    median_s = row.latency["median_ms"] / 1e3
    row.gmacs = macs * row.batch / 1e9
    row.achieved_gflops = 2 * row.gmacs / median_s
    row.pct_of_gemm_peak = 100 * row.achieved_gflops / probe.sgemm_gflops
    row.weight_mb = weight_bytes / 1e6
    row.floor_ms = 1e3 * max(2 * row.gmacs / probe.sgemm_gflops,
                             weight_bytes / 1e9 / probe.read_gbps)
    row.throughput_ips = row.batch / median_s


def benchmark(loaded: LoadedModel, config: BenchConfig, *,
              conversions: Conversions | None = None, reuse: Sequence[ExportResult] = (),
              calibration: CalibrationSet | None = None, reduce_range: bool = False,
              devices: Sequence[Device] = (),
              progress: Callable[[str], None] = lambda _: None) -> BenchReport:
    """Prepare ``loaded`` and its static twin (:func:`prepare_subjects`), then measure them.

    They are measured on this host, then on each of ``devices``.
    """
    subjects = prepare_subjects(loaded, config, conversions=conversions, reuse=reuse,
                                calibration=calibration, reduce_range=reduce_range,
                                progress=progress)
    return run_benchmark(subjects, loaded.io_spec, config, devices=devices, progress=progress)


def device_rows(subjects: Sequence[BenchSubject], io_spec: IOSpec, config: BenchConfig,
                device: Device, *, progress: Callable[[str], None] = lambda _: None
                ) -> list[BenchRow]:
    """The device cells: each shipped artifact of both subjects timed on ``device``.

    Latency is what the runner measured on the device, in interleaved A/B rounds (one timed
    inference of each per round, order alternating) after ``warmup`` runs of each; the ratio
    to the static twin comes from those rounds. An emulated device gets rows marked skipped:
    its timings say nothing about latency (its numerics are checked by ``validate``).
    """
    rows: list[BenchRow] = []
    size = io_spec.inputs[0].shape[-1]
    timed = [b for b in parse_bench_formats(config.formats) if b.artifact in DEVICE_BENCH_FORMATS]
    settings = config.settings
    for bench_format in timed:
        for batch in config.batches:
            for threads in config.threads:
                progress(f"{bench_format.name}@{device.name} batch={batch} threads={threads}")
                cell = {s.role: BenchRow(s.name, s.role, f"{bench_format.name}@{device.name}",
                                         batch, threads, size, s.strategy, device=device.name)
                        for s in subjects}
                rows += cell.values()
                if device.emulated:
                    for row in cell.values():
                        row.status, row.reason = Status.SKIPPED, (
                            "emulated device: numerics only, no latency (its timings say "
                            "nothing of a real core's; validate --device checks it)")
                    continue
                try:
                    times = _device_rounds(subjects, bench_format.artifact, device, batch,
                                           threads, io_spec, settings)
                except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on
                    for row in cell.values():
                        row.status, row.reason = Status.FAILED, f"{type(exc).__name__}: {exc}"
                    continue
                if times is None:
                    for row in cell.values():
                        row.status = Status.SKIPPED
                        row.reason = f"the artifact does not take batch {batch}"
                    continue
                for role, row in cell.items():
                    row.latency = summarize(times[role]).to_dict()
                    row.throughput_ips = batch / (row.latency["median_ms"] / 1e3)
                    artifact = next(s for s in subjects if s.role == role).artifacts[
                        bench_format.artifact]
                    row.artifact_mb = artifact.file_size_bytes / 1e6
                if {"odconv", "static"} <= set(times):
                    cell["odconv"].ratio_to_static = paired_ratio(times["odconv"],
                                                                  times["static"])
    return rows


def _device_rounds(subjects: Sequence[BenchSubject], fmt: ExportFormat, device: Device,
                   batch: int, threads: int, io_spec: IOSpec, settings: MeasureSettings
                   ) -> dict[str, list[float]] | None:
    """Seconds per timed inference of each subject on the device.

    None if a subject's artifact does not take ``batch``.
    """
    feed = {t.name: x.numpy() for t, x in zip(io_spec.inputs, io_spec.sample_inputs(batch),
                                               strict=True)}
    runners = {}
    for s in subjects:
        artifact = s.artifacts.get(fmt)
        if artifact is None or not artifact.ok:
            raise RuntimeError(f"{s.name}: no {fmt.value} artifact"
                               + (f" ({artifact.error})" if artifact else ""))
        runners[s.role] = DeviceRunner.from_export(device, artifact, threads=threads)
    try:
        for runner in runners.values():
            runner.activate()
            if not runner.accepts_batch(batch):
                return None
            runner.benchmark(feed, warmup=settings.warmup, runs=1)
        times: dict[str, list[float]] = {role: [] for role in runners}
        order = list(runners.items())
        for i in range(settings.iterations):
            for role, runner in (order if i % 2 == 0 else order[::-1]):
                times[role] += [t / 1e3 for t in runner.benchmark(feed, warmup=0, runs=1)]
        return times
    finally:
        for runner in runners.values():
            runner.deactivate()


def run_benchmark(subjects: Sequence[BenchSubject], io_spec: IOSpec, config: BenchConfig, *,
                  devices: Sequence[Device] = (),
                  progress: Callable[[str], None] = lambda _: None) -> BenchReport:
    """Measure every subject in every format, batch and thread count.

    Each (format, batch, threads) cell measures the subjects separately (cold start, warm
    latency, memory), then runs the ODConv model and its static twin in interleaved A/B
    rounds for the ratio. A cell that fails is recorded with its reason and the sweep goes on.
    Then each device's cells (:func:`device_rows`).
    """
    timed: list[BenchFormat] = parse_bench_formats(config.formats)
    spec = io_spec
    size = spec.inputs[0].shape[-1]
    report = BenchReport(config, machine_info(),
                         {t: probe_machine(t) for t in sorted(set(config.threads))})
    prepared = {}
    for subject in subjects:
        complexity = measure_complexity(subject.model, inputs=spec.sample_inputs(1))
        weight_bytes = stored_weight_bytes(subject.model)
        prepared[subject.role] = (subject, subject.model, subject.artifacts, complexity.macs,
                                  weight_bytes)
        report.artifacts += [a.to_dict() for a in subject.artifacts.values()]
    cells = [(b, n, t) for b in timed for n in config.batches for t in config.threads]
    for i, (bench_format, batch, threads) in enumerate(cells, 1):
        progress(f"[{i}/{len(cells)}] {bench_format.name} batch={batch} threads={threads}")
        rows, runners = {}, {}
        feed = {t.name: x.numpy() for t, x in zip(spec.inputs, spec.sample_inputs(batch),
                                                   strict=True)}
        for role, (item, model, artifacts, macs, weight_bytes) in prepared.items():
            row = BenchRow(item.name, role, bench_format.name, batch, threads, size, item.strategy)
            rows[role] = row
            report.rows.append(row)
            artifact = artifacts.get(bench_format.artifact) if bench_format.artifact else None
            if bench_format.artifact and (artifact is None or not artifact.ok):
                row.status, row.reason = Status.FAILED, (artifact.error if artifact
                                                    else "artifact missing")
                continue
            make = functools.partial(bench_format.make, model, spec, artifact, threads)
            try:
                probe_runner = make()
                probe_runner.activate()
                accepted = probe_runner.accepts_batch(batch)
                probe_runner.deactivate()
                if not accepted:
                    row.status = Status.SKIPPED
                    row.reason = f"the artifact does not take batch {batch}"
                    continue
                m = measure(make, feed, config.settings)
            except BackendUnavailableError as exc:
                row.status, row.reason = Status.SKIPPED, str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on
                row.status, row.reason = Status.FAILED, f"{type(exc).__name__}: {exc}"[:500]
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
    for device in devices:
        report.rows += device_rows(subjects, io_spec, config, device, progress=progress)
    return report
