"""Turn export results into the runners that can execute them, and validate them all.

Also the routing check of artifacts: a debug export per format, whose extra outputs are every
ODConv layer's attentions and output (:mod:`odconv_deploy.validation.routing`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from export.formats import FORMATS
from export.quantize_pt2e import load_reference
from export.result import ExportFormat
from export.run import export_formats
from odconv_deploy.conversions import Conversions
from odconv_deploy.devices import Device, DeviceRunner
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.model_source import describe_io, parse_input_shapes
from odconv_deploy.quantize import weight_storage
from odconv_deploy.runners import (
    BackendUnavailableError,
    ExecuTorchRunner,
    OnnxRuntimeRunner,
    Runner,
    TorchRunner,
)
from odconv_deploy.validation.compare import DEFAULT_TOLERANCES
from odconv_deploy.validation.golden import Golden, GoldenRunner, check_golden_artifact
from odconv_deploy.validation.on_device import on_device_report
from odconv_deploy.validation.probes import ProbedModel
from odconv_deploy.validation.routing import RoutingReport, RunnerRouting, check_routing
from odconv_deploy.validation.validate import (
    Candidate,
    ValidationReport,
    merge_reports,
    validate,
    validate_feeds,
)

#: The formats a routing check exports: one per runtime that computes them. The simplified
#: ONNX and the ``.ort`` file run in the same ONNX Runtime as the ONNX (and their outputs are
#: compared with PyTorch by the validation itself).
ROUTING_FORMATS = (ExportFormat.ONNX, ExportFormat.COREML, ExportFormat.EXECUTORCH)
#: The reference of an int8w run: the deploy model with its kernel banks int8.
QUANTIZED_REFERENCE = "torch int8w (kernel banks int8)"
#: The reference of a lut6w run: the deploy model with its kernel banks palettized.
PALETTIZED_REFERENCE = "torch lut6w (kernel banks palettized)"
#: The reference of an int8 run's ONNX artifacts: the QDQ graph computed as written (float ops
#: on dequantized values), which ONNX Runtime does with its graph optimisations off.
INT8_REFERENCE = "int8 QDQ graph as written (onnxruntime, opt off)"
#: The reference of an int8 .pte: the PT2E-converted PyTorch program it was lowered from.
PT2E_REFERENCE = "torch int8 PT2E program (the .pte's reference)"


#: The artifact of each runtime a device runs: the one users ship (the ``.ort`` file, else the
#: simplified ONNX, else the ONNX; the ``.pte``).
DEVICE_FORMATS = ((ExportFormat.ORT, ExportFormat.ONNX_SIMPLIFIED, ExportFormat.ONNX),
                  (ExportFormat.EXECUTORCH,))


def device_artifacts(results: Sequence[object]) -> list[object]:
    """The artifacts a device runs (:data:`DEVICE_FORMATS`), among those exported."""
    chosen = []
    for preference in DEVICE_FORMATS:
        found = next((r for fmt in preference for r in results if r.ok and r.format is fmt),
                     None)
        if found is not None:
            chosen.append(found)
    return chosen


def device_candidates(results: Sequence[object], devices: Sequence[Device]
                      ) -> list[Candidate]:
    """A device runner per device and shipped artifact, at the rule its host runner takes.

    int8 kernels are held to the int8 rule, everything else to the float32 rule.
    """
    return [Candidate(DeviceRunner.from_export(device, r, name=f"{r.format.value} @ "
                                                              f"{device.name}"),
                      "int8" if r.options.get("weights") == "int8" else "fp32")
            for device in devices for r in device_artifacts(results)]


def host_twin(runner: DeviceRunner) -> Runner:
    """The same artifact in the same runtime on this host.

    A device's outputs are compared with it beside PyTorch.
    """
    if runner.runtime == "onnxruntime":
        return OnnxRuntimeRunner(runner.path, name=f"onnxruntime (host) {runner.path.name}")
    return ExecuTorchRunner(runner.path, input_names=runner.input_names,
                            input_shapes=runner.input_shapes, output_names=runner.output_names,
                            max_batch=runner.max_batch, name=f"executorch (host) "
                                                             f"{runner.path.name}")


def attach_on_device(report: ValidationReport, devices: Sequence[Device],
                     candidates: Sequence[Candidate]) -> ValidationReport:
    """``report`` with its "on device" section for ``devices`` (none when no device)."""
    if devices:
        report.on_device = on_device_report(
            devices, [c.runner for c in candidates if isinstance(c.runner, DeviceRunner)],
            host_twin)
    return report


def quantized_reference_name(model: nn.Module) -> str:
    """The name of a quantized deploy model as a reference (by how it stores its banks)."""
    return PALETTIZED_REFERENCE if weight_storage(model) == "lut6w" else QUANTIZED_REFERENCE


def int8_references(results: Sequence[object], io_spec: IOSpec,
                    devices: Sequence[Device] = ()) -> list[tuple[Runner, list[Candidate]]]:
    """The references of an int8 run's artifacts, each with the runners checked against it.

    ONNX family: the ``.onnx`` (else ``.sim.onnx``) run with optimisations off, the graph as
    written; its other runners are the candidates (graphs as written at the float32 rule, int8
    kernels at the int8 rule). ExecuTorch: the PT2E-converted PyTorch program saved beside the
    ``.pte`` (:mod:`export.quantize_pt2e`), against which XNNPACK's int8 kernels run. The
    device runners of ``devices`` join the group of their artifact.

    Raises:
        ValueError: No artifact was exported.
        ExportError: An int8 ``.pte`` without its saved reference.
    """
    groups: list[tuple[Runner, list[Candidate]]] = []
    source = next((r for fmt in (ExportFormat.ONNX, ExportFormat.ONNX_SIMPLIFIED)
                   for r in results if r.ok and r.format is fmt), None)
    onnx_family = [r for r in results if r.ok and r.format is not ExportFormat.EXECUTORCH]
    if onnx_family:
        if source is None:
            raise ValueError("the reference of int8 ONNX artifacts is their ONNX graph, and no "
                             ".onnx or .sim.onnx was exported")
        reference = OnnxRuntimeRunner(str(source.path), optimization="off",
                                      name=INT8_REFERENCE)
        groups.append((reference, [
            c for c in candidates_for(onnx_family)
            if not (isinstance(c.runner, OnnxRuntimeRunner)
                    and c.runner.path == reference.path and c.runner.optimization == "off")]
            + device_candidates(onnx_family, devices)))
    for pte in (r for r in results if r.ok and r.format is ExportFormat.EXECUTORCH):
        program = load_reference(pte.path)
        groups.append((TorchRunner(program, io_spec, name=PT2E_REFERENCE),
                       candidates_for([pte]) + device_candidates([pte], devices)))
    if not groups:
        raise ValueError("no int8 artifact was exported, so there is nothing to validate")
    return groups


def validate_int8(results: Sequence[object], io_spec: IOSpec, *, batches: Sequence[int] = (1, 3),
                  seed: int = 0, image_folder: str | None = None,
                  devices: Sequence[Device] = (),
                  progress: Callable[[str], None] = lambda _: None) -> ValidationReport:
    """Every int8 artifact against its reference (:func:`int8_references`), one report."""
    groups = int8_references(results, io_spec, devices)
    reports = [validate(reference, candidates, io_spec, batches=batches, seed=seed,
                        image_folder=image_folder, progress=progress)
               for reference, candidates in groups]
    return attach_on_device(merge_reports(reports), devices,
                           [c for _, candidates in groups for c in candidates])


def candidates_for(results: Sequence[object], *, deploy_model: nn.Module | None = None,
                   io_spec: IOSpec | None = None, deploy_name: str = "torch (deploy form)"
                   ) -> list[Candidate]:
    """Every runner that can execute each artifact (plus the PyTorch deploy form if given).

    The runners of each format come from the format table (:data:`export.formats.FORMATS`):
    ONNX models run in ONNX Runtime with graph optimisations off and full; ``.ort`` files in
    ONNX Runtime; ``.pte`` in ExecuTorch; ``.mlpackage`` in the MIL reference executor and,
    on macOS, in Core ML itself. Failed exports are left out (their failure is reported by
    the export step).
    """
    found: list[Candidate] = []
    if deploy_model is not None:
        found.append(Candidate(TorchRunner(deploy_model, io_spec, name=deploy_name), "fp32"))
    for result in results:
        if result.ok:
            found += FORMATS[result.format].validation_runners(result)
    return found


def validate_artifacts(model: nn.Module, results: Sequence[object], *,
                       io_spec: IOSpec | None = None,
                       input_shape: tuple[int, ...] | None = None,
                       deploy_model: nn.Module | None = None, batches: Sequence[int] = (1, 3),
                       seed: int = 0, image_folder: str | None = None,
                       quantized: bool = False, int8: bool = False,
                       devices: Sequence[Device] = (),
                       progress: Callable[[str], None] = lambda _: None) -> ValidationReport:
    """Check every artifact (and the deploy form) against the PyTorch model ``model``.

    The I/O spec is ``io_spec``, else the model's own or one for ``input_shape`` (as the
    exporters take it), with the outputs named after what the model returns. With
    ``quantized`` (an ``int8w`` or ``lut6w`` run) the reference is ``deploy_model`` itself,
    the quantized model the artifacts were made from: they must compute what it computes, at
    the float rules (the quantization's own cost is the drift,
    :mod:`odconv_deploy.validation.drift`).
    With ``int8`` each artifact is checked against its int8 reference (:func:`int8_references`).
    With ``devices`` the shipped artifacts (:func:`device_artifacts`) also run on each device,
    at the same rules, and the report gets its "on device" section.
    """
    if io_spec is None:
        declared = getattr(model, "io_spec", None)
        inputs = None if input_shape is None else parse_input_shapes(
            ",".join(map(str, (1, *input_shape[1:]))))
        model, io_spec = describe_io(model, type(model).__name__,
                                     declared if isinstance(declared, IOSpec) else None, inputs)
    if int8:
        return validate_int8(results, io_spec, batches=batches, seed=seed,
                             image_folder=image_folder, devices=devices, progress=progress)
    if quantized:
        if deploy_model is None:
            raise ValueError("quantized=True needs the quantized deploy_model as the reference")
        reference = TorchRunner(deploy_model, io_spec,
                                name=quantized_reference_name(deploy_model))
        deploy_model = None
    else:
        reference = TorchRunner(model, io_spec, name="torch (train form)")
    candidates = (candidates_for(results, deploy_model=deploy_model, io_spec=io_spec)
                  + device_candidates(results, devices))
    return attach_on_device(validate(reference, candidates, io_spec, batches=batches, seed=seed,
                                    image_folder=image_folder, progress=progress),
                           devices, candidates)


def check_against_golden(golden: Golden, result: object, *, classifier: bool = False,
                         progress: Callable[[str], None] = lambda _: None) -> ValidationReport:
    """Check a Core ML artifact's runners against outputs recorded from Core ML ``predict``.

    The reference replays the recorded outputs on the recorded inputs; the candidates are the
    format's runners (the MIL executor, and ``predict`` where it runs), with the tolerances
    they have in validation.

    Raises:
        GoldenError: The golden outputs were recorded for another artifact.
    """
    check_golden_artifact(golden, result.path)
    return validate_feeds(GoldenRunner(golden), candidates_for([result]), golden.feeds,
                          classifier=classifier, progress=progress)


def routed_formats(results: Sequence[object]) -> list[ExportFormat]:
    """The formats of :data:`ROUTING_FORMATS` among ``results`` that exported."""
    exported = {r.format for r in results if r.ok}
    return [fmt for fmt in ROUTING_FORMATS if fmt in exported]


def routing_agreement(conversions: Conversions, io_spec: IOSpec, out_dir: str | Path, *,
                      formats: Sequence[ExportFormat] = ROUTING_FORMATS,
                      dynamic_batch: bool = True, batch_size: int = 1,
                      onnx_target: str = "onnx", coreml_precision: str = "fp16",
                      batch: int = 3, seed: int = 0,
                      progress: Callable[[str], None] = lambda _: None) -> RoutingReport:
    """Routing agreement of every format in ``formats``, as each would be exported.

    Each format gets the deploy form its artifact has (``conversions`` for its ``auto``
    target), wrapped in a :class:`ProbedModel` and exported with the same settings under
    ``out_dir`` (``*_probes.*`` files); its runners then run it beside the probed model in
    PyTorch on the same seeded input. A debug export that fails is a failed run with the reason.
    An int8 run's layers are checked in its int8w graphs (the deploy model holds the int8
    banks; no QDQ): quantized activations would move every layer's inputs off PyTorch's.
    """
    report = RoutingReport()
    if not conversions.layer_count:
        report.skipped.append(("every runner", "the model has no ODConv layer, so there is no "
                               "routing to check"))
        return report
    if not formats:
        report.skipped.append(("every runner", "no traced format (onnx, coreml, pte) was "
                               "exported, so there is nothing to probe"))
        return report
    for fmt in formats:
        info = FORMATS[fmt]
        deploy = conversions.get(info.auto_target(onnx_target), dynamic_batch).model
        probed = ProbedModel(deploy, io_spec)
        (result,) = [r for r in export_formats(
            probed, out_dir, [fmt], stem=f"{probed.zoo_name}_probes", io_spec=probed.io_spec,
            strategy=conversions.strategy, dynamic_batch=dynamic_batch, batch_size=batch_size,
            onnx_target=onnx_target, coreml_precision=coreml_precision, overwrite=True,
            measure_sizes=False, progress=progress) if r.format is fmt]
        if not result.ok:
            report.runs.append(RunnerRouting(
                fmt.value, "fp32", batch, DEFAULT_TOLERANCES["fp32"],
                error=f"the debug export (with every layer's probes) failed: {result.error}"))
            continue
        part = check_routing(probed, candidates_for([result]), batch=batch, seed=seed,
                             progress=progress)
        report.runs += part.runs
        report.skipped += part.skipped
    return report


@dataclass
class AccuracyRow:
    """Test accuracy of one runner and its agreement with the PyTorch predictions."""

    runner: str
    accuracy: float | None
    agreement: float | None
    skipped: str | None = None


def accuracy_table(reference: Runner, candidates: Sequence[Candidate], images: np.ndarray,
                   labels: np.ndarray, *, batch: int = 1) -> list[AccuracyRow]:
    """Accuracy of the reference and every candidate on a labelled set (batch ``batch``).

    Runs in chunks of ``batch`` (use 1 for artifacts with a fixed batch). Bound-only
    candidates (the MIL executor's fp16-accumulation model) are left out: they bracket the
    numbers for validation and are no runtime a user ships (and run op by op in Python).
    """
    def predictions(runner: Runner) -> np.ndarray:
        name = runner.input_metadata()[0].name
        size = batch if runner.accepts_batch(batch) else 1
        chunks = [next(iter(runner.infer({name: images[i:i + size]}).values()))
                  for i in range(0, len(images), size)]
        return np.concatenate(chunks).argmax(axis=1)

    with reference:
        truth = predictions(reference)
    rows = [AccuracyRow(reference.name, float((truth == labels).mean()), 1.0)]
    for cand in (c for c in candidates if not c.bound_only):
        try:
            with cand.runner:
                pred = predictions(cand.runner)
        except BackendUnavailableError as exc:
            rows.append(AccuracyRow(cand.runner.name, None, None, skipped=str(exc)))
            continue
        rows.append(AccuracyRow(cand.runner.name, float((pred == labels).mean()),
                                float((pred == truth).mean())))
    return rows
