"""``strategy="tune"``: each layer's deploy form chosen by timing, on the target runtime.

For every ODConv layer, each exact deploy form it admits for the target
(:func:`~odconv_deploy.strategy_choice.admissible_forms`) is converted on its own (verified in
float64 like any conversion), exported to the target's format at the layer's own input shape,
and timed in the target runtime, on this host or on a device (the runner's own timings, see
:mod:`odconv_deploy.devices`). The forms are timed in interleaved rounds (one inference of each
per round, order rotating), so a drift of a shared machine hits all of them; the fastest median
wins. Timings are cached per (layer geometry, runtime and version, CPU): a layer shape met
again, in this model or another, is not timed again on the same runtime and CPU, and a new
runtime release or another CPU times afresh.

A layer timed alone misses what it costs inside the graph (the layout changes between its
neighbours, fusions, caches): where the per-layer choices differ from ``auto``'s plan, both
whole graphs are exported and timed the same way and the faster plan is kept (on
od_mobilenetv2_100's ``.pte`` the per-layer plan was 7% slower than ``auto``'s).

The fixed rules of ``auto`` remain the fallback: for targets that are not timed here (Core ML
off macOS, PyTorch eager) and for emulated devices (their timings say nothing about latency).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.formats import FORMATS
from export.result import ExportFormat
from export.to_executorch import export_executorch
from export.to_onnx import export_onnx
from odconv_deploy._atomic import atomic_output
from odconv_deploy._version import __version__
from odconv_deploy.conversions import Conversions
from odconv_deploy.detect import inspect_odconv
from odconv_deploy.devices import Device, DeviceRunner
from odconv_deploy.devices.cpu import describe_cpu
from odconv_deploy.devices.host import read_cpuinfo
from odconv_deploy.devices.provision import cache_root
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.layers.spec import ODConvSpec
from odconv_deploy.reparameterize import convert_model, find_odconv_layers
from odconv_deploy.runners import ExecuTorchRunner, OnnxRuntimeRunner, Runner
from odconv_deploy.strategy_choice import TUNE_STRATEGY, AutoStrategy, admissible_forms

#: Targets timed here, and the runtime that times each.
TUNED_TARGETS = {"onnx": "onnxruntime", "onnxruntime": "onnxruntime",
                 "executorch": "executorch"}
#: Version of the cache's keys and of the forms' graphs as timed; a change re-times
#: everything (2: depthwise_taps reads flat runs; dynamic_linear; 3: ort_nchwc takes 1x1 and
#: padded layers, its maps stay blocked between layers; 4: the chains start at a static stem).
CACHE_VERSION = 4


@dataclass(frozen=True)
class TuneSettings:
    """How long each form is timed: ``warmup`` runs, then ``rounds`` interleaved rounds."""

    warmup: int = 3
    rounds: int = 15
    threads: int = 1
    #: Where the tuned plan differs from auto's, time both whole graphs and keep the faster
    #: (a layer timed alone misses what it costs inside the graph: layouts, fusions, caches).
    whole_graph: bool = True


@dataclass
class WholeGraphCheck:
    """The tuned plan's whole graph timed against auto's: median ms of each, the one kept."""

    tuned_ms: float
    auto_ms: float
    kept: str  # "tune" or "auto"
    cached: bool = False


@dataclass
class LayerChoice:
    """One layer's tuning: the forms timed (median ms), the chosen one, whether cached."""

    layer: str
    input_shape: tuple[int, ...]
    key: str
    timings_ms: dict[str, float]
    chosen: str
    cached: bool = False
    #: ``depthwise 3x3``, ``1x1`` or ``3x3`` (what the per-class sums of a profile group by).
    kind: str = ""


@dataclass
class TunedPlan:
    """A model's tuned plan for one target: one form per layer, and why."""

    target: str
    dynamic_batch: bool
    runtime: str
    where: str
    forms: tuple[str, ...] = ()
    layers: list[LayerChoice] = field(default_factory=list)
    note: str = ""
    #: Set where the per-layer choices differ from auto's plan (see TuneSettings.whole_graph).
    whole_graph: WholeGraphCheck | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return asdict(self)

    def to_markdown(self) -> str:
        """One row per layer: the forms' medians, the choice, and whether it was cached."""
        from odconv_deploy.tables import markdown_table

        if not self.layers:
            return f"Tuning for {self.target}: {self.note}\n"
        forms = sorted({f for c in self.layers for f in c.timings_ms})
        rows = [[c.layer, c.kind, "x".join(map(str, c.input_shape)),
                 *(f"{c.timings_ms[f]:.3f}" if f in c.timings_ms else "-" for f in forms),
                 c.chosen, "cache" if c.cached else "timed"] for c in self.layers]
        head = (f"Tuned plan for {self.target} ({'dynamic' if self.dynamic_batch else 'fixed'}"
                f" batch) on {self.where}, {self.runtime}: median ms per form")
        lines = [head, "", *markdown_table(
            ["layer", "conv", "input", *forms, "chosen", "source"], rows)]
        check = self.whole_graph
        if check is not None:
            kept = ("the tuned plan" if check.kept == "tune"
                    else "auto's plan (the per-layer choices above are not used)")
            lines += ["", f"Whole graph: tuned plan {check.tuned_ms:.3f} ms, auto's "
                      f"{check.auto_ms:.3f} ms ({'cache' if check.cached else 'timed'}); kept "
                      f"{kept}."]
        return "\n".join(lines) + "\n"


def layer_kind(spec: ODConvSpec) -> str:
    """``depthwise 3x3``, ``1x1`` or ``3x3``: the class of conv a layer is."""
    size = f"{spec.kernel_size}x{spec.kernel_size}"
    return f"depthwise {size}" if spec.depthwise else size


def tuning_key(spec: ODConvSpec, input_shape: Sequence[int], *, target: str,
               dynamic_batch: bool, runtime: str, runtime_version: str, cpu: str,
               threads: int) -> str:
    """The cache key of one layer's timings: its geometry, the runtime and release, the CPU.

    Two layers share timings only when everything that decides their speed is the same: the
    layer's shape and attention heads, its input, the target and batch mode, the runtime and
    its version, the CPU model with its kernel-deciding features, the thread count, and this
    package's release (which writes the forms' graphs).
    """
    geometry = {"in": spec.in_channels, "out": spec.out_channels, "k": spec.kernel_size,
                "stride": spec.stride, "padding": spec.padding, "dilation": spec.dilation,
                "groups": spec.groups, "kernel_num": spec.kernel_num,
                "attention": spec.attention_channels, "heads": sorted(spec.heads),
                "input": list(input_shape)}
    text = json.dumps({"v": CACHE_VERSION, "package": __version__, "geometry": geometry,
                       "target": target, "dynamic_batch": dynamic_batch, "runtime": runtime,
                       "version": runtime_version, "cpu": cpu, "threads": threads},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class TuningCache:
    """Timings by :func:`tuning_key`, in one JSON file (default ``<cache>/tuning.json``)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else cache_root() / "tuning.json"
        try:
            self.entries: dict[str, dict[str, float]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def get(self, key: str) -> dict[str, float] | None:
        """The cached medians (ms per form) of ``key``, if any."""
        return self.entries.get(key)

    def put(self, key: str, timings_ms: dict[str, float]) -> None:
        """Store and write the file whole."""
        self.entries[key] = timings_ms
        with atomic_output(self.path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))


def layer_input_shapes(model: nn.Module, io_spec: IOSpec) -> dict[str, tuple[int, ...]]:
    """The input shape each ODConv layer sees on the model's batch-1 sample input."""
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape))  # returns None: args unchanged
        return record

    hooks = [layer.register_forward_pre_hook(recorder(name))
             for name, layer in find_odconv_layers(model)]
    try:
        with torch.no_grad():
            model.eval()(*io_spec.sample_inputs(1))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _where(device: Device | None, runtime: str) -> tuple[str, str, str]:
    """(device name, CPU description, runtime version) the timings are taken on."""
    if device is None:
        cpu = describe_cpu(read_cpuinfo())
        version = importlib.metadata.version(runtime).split("+")[0]
        return "host", f"{cpu['model']} [{' '.join(cpu['features'])}]", version
    check = device.check()
    cpu = check.details.get("cpu") or {}
    return (device.name, f"{cpu.get('model', '?')} [{' '.join(cpu.get('features', []))}]",
            check.runtimes.get(runtime, "missing"))


class _LayerModule(nn.Module):
    """One converted layer as a model (its exporters want a module with one input)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.layer(x)


def _export(model: nn.Module, forms: tuple[str, ...], path: Path, target: str,
            dynamic_batch: bool, batch_size: int, *, io_spec: IOSpec | None = None,
            input_shape: tuple[int, ...] | None = None) -> object:
    """``model`` converted with one form per layer (``forms``, verified), exported for ``target``.

    The ``.pte`` or ``.onnx`` suffix is added to ``path``; a fixed-batch ``.pte`` is exported at
    the batch of ``input_shape`` (batch 1 with ``io_spec``).
    """
    converted = convert_model(copy.deepcopy(model), strategy=TUNE_STRATEGY, plan=forms).model
    if target == "executorch":
        return export_executorch(converted, path.with_suffix(".pte"),
                                 dynamic_batch=dynamic_batch, io_spec=io_spec,
                                 input_shape=input_shape, overwrite=True)
    return export_onnx(converted, path.with_suffix(".onnx"), dynamic_batch=dynamic_batch,
                       batch_size=batch_size, io_spec=io_spec, input_shape=input_shape,
                       target=target, overwrite=True)


def _runner(result: object, device: Device | None, threads: int) -> Runner:
    if device is not None:
        return DeviceRunner.from_export(device, result, threads=threads)
    if result.path.suffix == ".pte":
        return ExecuTorchRunner.from_export(result, threads=threads)
    return OnnxRuntimeRunner(result.path, threads=threads)


def _time_forms(results: dict[str, object], inputs: Sequence[np.ndarray],
                device: Device | None, settings: TuneSettings) -> dict[str, float]:
    """Median ms of each artifact (keyed by form or plan name), from interleaved rounds."""
    runners = {form: _runner(r, device, settings.threads) for form, r in results.items()}
    samples: dict[str, list[float]] = {form: [] for form in runners}
    try:
        for runner in runners.values():
            runner.activate()
        feeds = {form: {meta.name: value for meta, value in zip(r.input_metadata(), inputs,
                                                                 strict=True)}
                 for form, r in runners.items()}
        order = list(runners)

        def once(form: str) -> float:
            runner = runners[form]
            if isinstance(runner, DeviceRunner):
                return runner.benchmark(feeds[form], warmup=0, runs=1)[0]
            runner.infer(feeds[form])
            return 1e3 * runner.last_inference_time

        for _ in range(settings.warmup):
            for form in order:
                once(form)
        for i in range(settings.rounds):
            shift = i % len(order)
            for form in order[shift:] + order[:shift]:
                samples[form].append(once(form))
    finally:
        for runner in runners.values():
            runner.deactivate()
    return {form: float(np.median(times)) for form, times in samples.items()}


def tune_for_formats(conversions: Conversions, io_spec: IOSpec, formats: Sequence[ExportFormat],
                     *, onnx_target: str = "onnx", dynamic_batch: bool = True,
                     batch_size: int = 1, device: Device | None = None,
                     cache: TuningCache | None = None, settings: TuneSettings | None = None,
                     progress: Callable[[str], None] = lambda _: None) -> list[TunedPlan]:
    """Tune ``conversions`` (strategy ``tune``) for the target of each format, and set the plans.

    One plan per distinct target the formats are exported for (``auto``'s targets, see
    :meth:`export.formats.FormatInfo.auto_target`), each set with
    :meth:`~odconv_deploy.conversions.Conversions.set_tuned_plan`, so every export of the run
    converts with it.
    """
    return tune_for_targets(conversions, io_spec,
                            [FORMATS[f].auto_target(onnx_target) for f in formats],
                            dynamic_batch=dynamic_batch, batch_size=batch_size, device=device,
                            cache=cache, settings=settings, progress=progress)


def tune_for_targets(conversions: Conversions, io_spec: IOSpec, targets: Sequence[str], *,
                     dynamic_batch: bool = True, batch_size: int = 1,
                     device: Device | None = None, cache: TuningCache | None = None,
                     settings: TuneSettings | None = None,
                     progress: Callable[[str], None] = lambda _: None) -> list[TunedPlan]:
    """:func:`tune_for_formats` for ``auto`` targets named directly (each tuned once)."""
    plans = []
    for target in dict.fromkeys(targets):
        plan = tune_plan(conversions.model, io_spec, conversions.planning_target(target),
                         dynamic_batch=dynamic_batch, batch_size=batch_size, device=device,
                         cache=cache, settings=settings, progress=progress)
        conversions.set_tuned_plan(target, dynamic_batch, plan.forms)
        plans.append(plan)
    return plans


def tune_plan(model: nn.Module, io_spec: IOSpec, target: str, *, dynamic_batch: bool = True,
              batch_size: int = 1, device: Device | None = None,
              cache: TuningCache | None = None, settings: TuneSettings | None = None,
              progress: Callable[[str], None] = lambda _: None) -> TunedPlan:
    """Time every exact form of every ODConv layer of ``model`` for ``target``; the fastest.

    Args:
        model: The train-form network.
        io_spec: Its I/O spec (the layers' input shapes come from its sample input).
        target: An ``auto`` target; those not in :data:`TUNED_TARGETS` keep ``auto``'s plan.
        dynamic_batch: Whether the artifact takes any batch (the layer graphs do likewise).
        batch_size: The batch each layer is timed at (the artifact's, when it is fixed).
        device: Where to time (default this host); an emulated device keeps ``auto``'s plan.
        cache: Timings already taken (default the user cache file).
        settings: Warm-up, rounds and threads.
        progress: Told which layer is being timed.

    Returns:
        The plan (forms in layer order, for :class:`~odconv_deploy.conversions.Conversions`)
        with every layer's timings and, where the layers' choices differ from ``auto``'s, the
        whole-graph check that decided between the two plans.
    """
    settings = settings or TuneSettings()
    fallback = AutoStrategy(target, dynamic_batch)
    runtime = TUNED_TARGETS.get(target)
    specs = [inspect_odconv(layer, name) for name, layer in find_odconv_layers(model)]
    auto_forms = tuple(fallback.choose(s) for s in specs)
    plan = TunedPlan(target, dynamic_batch, runtime or "-", device.name if device else "host",
                     forms=auto_forms)
    if runtime is None or (device is not None and device.emulated):
        plan.note = ("not timed: " + (f"{target} is not a runtime this tool times; "
                                      if runtime is None else
                                      f"{device.name} is emulated, its timings say nothing "
                                      "about latency; ") + "auto's rules decide")
        return plan
    plan.where, cpu, version = _where(device, runtime)
    plan.runtime = f"{runtime} {version}"
    cache = cache if cache is not None else TuningCache()
    shapes = layer_input_shapes(model, io_spec)
    layers = dict(find_odconv_layers(model))
    forms = []
    with tempfile.TemporaryDirectory(prefix="odconv_tune_") as tmp:
        for i, spec in enumerate(specs, 1):
            shape = (batch_size, *shapes[spec.name][1:])
            key = tuning_key(spec, shape, target=target, dynamic_batch=dynamic_batch,
                             runtime=runtime, runtime_version=version, cpu=cpu,
                             threads=settings.threads)
            candidates = admissible_forms(spec, target, dynamic_batch)
            timings = cache.get(key)
            cached = timings is not None and set(timings) == set(candidates)
            if not cached:
                progress(f"tune [{i}/{len(specs)}] {spec.name} {'x'.join(map(str, shape))}: "
                         f"{', '.join(candidates)}")
                folder = Path(tmp) / str(i)
                folder.mkdir()
                layer = _LayerModule(layers[spec.name]).eval()
                results = {form: _export(layer, (form,), folder / form, target, dynamic_batch,
                                         batch_size, input_shape=shape)
                           for form in candidates}
                x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
                timings = _time_forms(results, [x], device, settings)
                cache.put(key, timings)
            chosen = min(timings, key=timings.get)
            forms.append(chosen)
            plan.layers.append(LayerChoice(spec.name, shape, key, timings, chosen, cached,
                                           layer_kind(spec)))
        plan.forms = tuple(forms)
        if settings.whole_graph and plan.forms != auto_forms:
            progress(f"tune: the tuned plan's whole graph against auto's ({target})")
            plan.whole_graph = _check_whole_graph(
                model, io_spec, plan, auto_forms, batch_size, device, cache, settings,
                Path(tmp))
            if plan.whole_graph.kept == "auto":
                plan.forms = auto_forms
    return plan


def _check_whole_graph(model: nn.Module, io_spec: IOSpec, plan: TunedPlan,
                       auto_forms: tuple[str, ...], batch_size: int, device: Device | None,
                       cache: TuningCache, settings: TuneSettings,
                       folder: Path) -> WholeGraphCheck:
    """Time the whole graph of ``plan.forms`` against ``auto_forms``' (cached like layers)."""
    key = hashlib.sha256(json.dumps(
        {"layers": [c.key for c in plan.layers], "tune": plan.forms, "auto": auto_forms},
        sort_keys=True).encode()).hexdigest()[:24]
    timings = cache.get(key)
    cached = timings is not None and set(timings) == {"tune", "auto"}
    if not cached:
        batch = 1 if plan.target == "executorch" and not plan.dynamic_batch else batch_size
        results = {name: _export(model, forms, folder / f"whole_{name}", plan.target,
                                 plan.dynamic_batch, batch, io_spec=io_spec)
                   for name, forms in (("tune", plan.forms), ("auto", auto_forms))}
        inputs = [t.numpy() for t in io_spec.sample_inputs(batch)]
        timings = _time_forms(results, inputs, device, settings)
        cache.put(key, timings)
    kept = "tune" if timings["tune"] <= timings["auto"] else "auto"
    return WholeGraphCheck(timings["tune"], timings["auto"], kept, cached)
