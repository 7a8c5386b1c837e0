"""Export one model to several formats; a failing format is recorded, the rest still run."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from export.formats import FORMATS, check_precision, with_sources
from export.result import ExportError, ExportFormat, ExportResult, fspath, root_cause
from export.simplify import simplify_onnx
from export.sizes import kernel_banks, size_split
from export.to_coreml import export_coreml
from export.to_executorch import export_executorch
from export.to_onnx import DEFAULT_OPSET, export_onnx
from export.to_ort import export_ort
from odconv_deploy.calibration import CalibrationSet
from odconv_deploy.conversions import Conversions
from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.layers.deploy import DEFAULT_STRATEGY
from odconv_deploy.strategy_choice import canonical_target


def failed_result(fmt: ExportFormat, path: os.PathLike, exc: BaseException) -> ExportResult:
    """The result of a format that could not be made: no artifact, the reason."""
    message = str(exc) if isinstance(exc, ODConvDeployError) else root_cause(exc)
    return ExportResult(format=fmt, path=fspath(path), input_names=[], output_names=[],
                        input_shapes={}, output_shapes={}, file_size_bytes=0, ok=False,
                        error=message)


def _require_batch_one(batch_size: int, fmt: str) -> None:
    if batch_size != 1:
        raise ExportError(
            f"A fixed batch of {batch_size} is made for ONNX and ORT only; {fmt} exports trace "
            "batch 1. Note: use a dynamic batch for it (the default)."
        )


@dataclass(frozen=True)
class _Job:
    """What one format's exporter gets: the traced model or the source artifact, options."""

    model: nn.Module | None
    source: ExportResult | None
    path: os.PathLike
    options: dict[str, object]


def _make(fmt: ExportFormat, job: _Job) -> ExportResult:
    o = job.options
    common = dict(io_spec=o["io_spec"], input_shape=o["input_shape"], name=o["name"],
                  overwrite=o["overwrite"], strategy=o["strategy"])
    if fmt is ExportFormat.ONNX:
        return export_onnx(job.model, job.path, opset=o["opset"],
                           dynamic_batch=o["dynamic_batch"], batch_size=o["batch_size"],
                           target=o["onnx_target"], calibration=o["calibration"],
                           reduce_range=o["reduce_range"], **common)
    if fmt is ExportFormat.ONNX_SIMPLIFIED:
        return simplify_onnx(job.source, job.path, overwrite=o["overwrite"])
    if fmt is ExportFormat.ORT:
        return export_ort(job.source, job.path, overwrite=o["overwrite"])
    if fmt is ExportFormat.COREML:
        _require_batch_one(o["batch_size"], "CoreML")
        return export_coreml(job.model, job.path, precision=o["coreml_precision"],
                             flexible_batch=o["dynamic_batch"], **common)
    _require_batch_one(o["batch_size"], "ExecuTorch")
    return export_executorch(job.model, job.path, dynamic_batch=o["dynamic_batch"],
                             calibration=o["calibration"], **common)


def export_formats(
    model: nn.Module,
    out_dir: str | os.PathLike,
    formats: Sequence[ExportFormat],
    *,
    stem: str | None = None,
    strategy: str | None = None,
    conversions: Conversions | None = None,
    io_spec: IOSpec | None = None,
    input_shape: tuple[int, ...] | None = None,
    opset: int = DEFAULT_OPSET,
    coreml_precision: str = "fp16",
    precision: str | None = None,
    dynamic_batch: bool = True,
    batch_size: int = 1,
    onnx_target: str = "onnx",
    overwrite: bool = False,
    measure_sizes: bool = True,
    calibration: CalibrationSet | None = None,
    reduce_range: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> list[ExportResult]:
    """Export ``model`` to every format in ``formats`` under ``out_dir``.

    Formats are made in the order of :data:`export.formats.FORMATS`, each with the
    formats it derives from (``ort`` from the simplified ONNX, itself from the ONNX export;
    those are produced too if not requested). A format that fails yields a result with
    ``ok=False`` and the reason; the others still run.

    The train-form model is converted through ``conversions`` (the caller's, so a run
    converts once per distinct per-layer plan; default: a new one with ``strategy``): each
    traced format gets the conversion for its ``strategy="auto"`` target
    (:meth:`export.formats.FormatInfo.auto_target`), all formats the same one for a named
    strategy.

    With ``dynamic_batch=False`` the graphs have batch ``batch_size``; a size other than 1 is
    made for ONNX, simplified ONNX and ORT only (CoreML and ExecuTorch then fail with the
    reason). ``onnx_target`` is :func:`export_onnx`'s ``target`` (``"onnxruntime"``: the
    ONNX-family files are for ONNX Runtime CPU on this machine). ``measure_sizes`` records
    each artifact's kernel-bank share (:mod:`export.sizes`; seconds for a large model).

    ``precision`` (default: the conversions', else ``fp32``) is checked against every format
    first (:func:`export.formats.check_precision`): ``int8w`` stores the kernel banks int8 (the
    conversions do it), ``fp16`` makes Core ML compute in fp16 (``coreml_precision`` is Core
    ML's compute precision otherwise), ``int8`` is int8w plus the ONNX graphs' static convs and
    linears quantized with activation ranges from ``calibration`` (required; ``reduce_range``:
    7-bit weights for x86 CPUs without VNNI; :mod:`export.quantize_onnx`).
    """
    out = fspath(out_dir)
    onnx_target = canonical_target(onnx_target)
    name = stem or getattr(model, "zoo_name", None) or type(model).__name__
    if conversions is not None and precision not in (None, conversions.precision):
        raise ExportError(f"precision={precision!r} differs from the conversions' "
                          f"{conversions.precision!r}. Note: make the Conversions with it.")
    precision = precision or (conversions.precision if conversions else "fp32")
    check_precision(precision, list(formats))
    if precision == "int8" and calibration is None:
        raise ExportError("int8 needs calibration data: the activation ranges come from real "
                          "inputs. Note: pass --calibration DIR (images or .npy arrays), or "
                          "calibration=... from Python (odconv_deploy.calibration).")
    if precision != "int8":
        calibration = None
    elif not dynamic_batch and len(calibration) < batch_size:
        raise ExportError(f"A graph with a fixed batch of {batch_size} calibrates on batches of "
                          f"{batch_size}, and the calibration has {len(calibration)} samples. "
                          f"Note: give at least {batch_size}.")
    if precision == "fp16":
        coreml_precision = "fp16"
    if conversions is None:
        conversions = Conversions(model, strategy or DEFAULT_STRATEGY, precision=precision)
    # The label stamped into artifacts: the conversions' strategy (a model already in deploy
    # form has its own layers' forms, which prepare_model reads).
    label = conversions.strategy if conversions.layer_count else strategy
    options = dict(io_spec=io_spec, input_shape=input_shape, name=name, overwrite=overwrite,
                   strategy=label, opset=opset, coreml_precision=coreml_precision,
                   dynamic_batch=dynamic_batch, batch_size=batch_size, onnx_target=onnx_target,
                   calibration=calibration, reduce_range=reduce_range)
    made: dict[ExportFormat, ExportResult] = {}
    traced: dict[ExportFormat, nn.Module] = {}  # the deploy model each format was made from
    for fmt in with_sources(list(dict.fromkeys(formats))):
        info = FORMATS[fmt]
        path = info.path(out, name)
        progress(f"export {fmt.value}")
        try:
            if info.derived_from:
                source = next((made[f] for f in info.derived_from if made[f].ok), None)
                if source is None:
                    raise ExportError(f"the {info.derived_from[-1].value} export it is made "
                                      "from failed")
                job = _Job(None, source, path, options)
                traced[fmt] = traced[source.format]
            else:
                traced[fmt] = conversions.get(info.auto_target(onnx_target), dynamic_batch).model
                job = _Job(traced[fmt], None, path, options)
            made[fmt] = _make(fmt, job)
        except Exception as exc:  # noqa: BLE001 - recorded in the result; other formats go on
            made[fmt] = failed_result(fmt, path, exc)
            continue
        if measure_sizes:
            _add_size_split(made[fmt], traced[fmt])
    return list(made.values())


def _add_size_split(result: ExportResult, deploy: nn.Module) -> None:
    """Record how much of the artifact is kernel banks (a note if it cannot be measured)."""
    try:
        split = size_split(result, kernel_banks(deploy))
    except Exception as exc:  # noqa: BLE001 - a figure missing, the artifact is fine
        result.notes.append(f"kernel-bank size not measured: {root_cause(exc)}")
        return
    if split is not None:
        result.details["size_split"] = split
