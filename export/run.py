"""Export one model to several formats; a failing format is recorded, the rest still run."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from torch import nn

from export._common import ExportError, ExportFormat, ExportResult, fspath, root_cause
from export.simplify import simplify_onnx
from export.to_coreml import export_coreml
from export.to_executorch import export_executorch
from export.to_onnx import DEFAULT_OPSET, export_onnx
from export.to_ort import export_ort
from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.layers.deploy import DEFAULT_STRATEGY
from odconv_deploy.reparameterize import convert_model, find_odconv_layers
from odconv_deploy.strategy_choice import AUTO_STRATEGY


def _failure(fmt: ExportFormat, path: os.PathLike, exc: BaseException) -> ExportResult:
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


def export_formats(
    model: nn.Module,
    out_dir: str | os.PathLike,
    formats: Sequence[ExportFormat],
    *,
    stem: str | None = None,
    strategy: str | None = None,
    converted: nn.Module | None = None,
    io_spec: IOSpec | None = None,
    input_shape: tuple[int, ...] | None = None,
    opset: int = DEFAULT_OPSET,
    coreml_precision: str = "fp16",
    dynamic_batch: bool = True,
    batch_size: int = 1,
    onnx_target: str = "onnx",
    overwrite: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> list[ExportResult]:
    """Export ``model`` to every format in ``formats`` under ``out_dir``.

    With ``dynamic_batch=False`` the graphs have batch ``batch_size``; a size other than 1 is
    made for ONNX, simplified ONNX and ORT only (CoreML and ExecuTorch then fail with the
    reason, as any failing format does).

    ``ort`` is made from the simplified ONNX model (``onnx`` and ``onnx-sim`` are produced for
    it if not requested). A format that fails yields a result with ``ok=False`` and the
    reason; the others still run. A train-form model is converted once for every format (or
    ``converted``, the caller's conversion of it with ``strategy``, is reused), except with
    ``strategy="auto"``, where each exporter converts the train form for its own target.
    ``onnx_target`` is :func:`export_onnx`'s ``target`` (``"ort"``: the ONNX-family files
    are for ONNX Runtime CPU on this machine).
    """
    out = fspath(out_dir)
    name = stem or getattr(model, "zoo_name", None) or type(model).__name__
    if strategy != AUTO_STRATEGY and find_odconv_layers(model):  # once, verified, for all
        model = converted or convert_model(model, strategy=strategy or DEFAULT_STRATEGY).model
        strategy = None
    common = dict(io_spec=io_spec, input_shape=input_shape, name=name, overwrite=overwrite,
                  strategy=strategy)
    wanted = list(dict.fromkeys(formats))
    results: list[ExportResult] = []
    onnx_result = sim_result = None
    if {ExportFormat.ONNX, ExportFormat.ONNX_SIMPLIFIED, ExportFormat.ORT} & set(wanted):
        progress("export onnx")
        try:
            onnx_result = export_onnx(model, out / f"{name}.onnx", opset=opset,
                                      dynamic_batch=dynamic_batch, batch_size=batch_size,
                                      target=onnx_target, **common)
        except Exception as exc:  # noqa: BLE001 - recorded in the result; other formats go on
            onnx_result = _failure(ExportFormat.ONNX, out / f"{name}.onnx", exc)
        results.append(onnx_result)
    if {ExportFormat.ONNX_SIMPLIFIED, ExportFormat.ORT} & set(wanted):
        progress("simplify onnx")
        if onnx_result.ok:
            sim_result = simplify_onnx(onnx_result, out / f"{name}.sim.onnx", overwrite=overwrite)
        else:
            sim_result = _failure(ExportFormat.ONNX_SIMPLIFIED, out / f"{name}.sim.onnx",
                                  ExportError("the ONNX export it starts from failed"))
        results.append(sim_result)
    if ExportFormat.ORT in wanted:
        progress("convert to ORT format")
        source = sim_result if sim_result.ok else onnx_result
        try:
            if not source.ok:
                raise ExportError("no ONNX model to convert (the ONNX export failed)")
            results.append(export_ort(source, out / f"{name}.ort", overwrite=overwrite))
        except Exception as exc:  # noqa: BLE001 - recorded in the result; other formats go on
            results.append(_failure(ExportFormat.ORT, out / f"{name}.ort", exc))
    if ExportFormat.COREML in wanted:
        progress("convert to CoreML")
        try:
            _require_batch_one(batch_size, "CoreML")
            results.append(export_coreml(model, out / f"{name}.mlpackage",
                                         precision=coreml_precision,
                                         flexible_batch=dynamic_batch, **common))
        except Exception as exc:  # noqa: BLE001 - recorded in the result; other formats go on
            results.append(_failure(ExportFormat.COREML, out / f"{name}.mlpackage", exc))
    if ExportFormat.EXECUTORCH in wanted:
        progress("lower to ExecuTorch (XNNPACK)")
        try:
            _require_batch_one(batch_size, "ExecuTorch")
            results.append(export_executorch(model, out / f"{name}.pte",
                                             dynamic_batch=dynamic_batch, **common))
        except Exception as exc:  # noqa: BLE001 - recorded in the result; other formats go on
            results.append(_failure(ExportFormat.EXECUTORCH, out / f"{name}.pte", exc))
    return results
