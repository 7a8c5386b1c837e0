"""ONNX Runtime Mobile: ``.ort`` format model plus the operator config for a minimal build."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

from export.result import (
    ExportError,
    ExportFormat,
    ExportResult,
    fspath,
    path_size,
    root_cause,
    tool_versions,
)
from odconv_deploy._atomic import atomic_output
from odconv_deploy.errors import require_backend

OPTIMIZATION_STYLES = ("fixed", "runtime")
TARGET_PLATFORMS = ("arm", "amd64")


def export_ort(
    source: str | os.PathLike | ExportResult,
    path: str | os.PathLike | None = None,
    *,
    optimization_style: str = "fixed",
    target_platform: str = "arm",
    overwrite: bool = False,
) -> ExportResult:
    """Convert an ONNX model to ORT format with onnxruntime's own tooling.

    Writes ``model.ort`` and ``model.required_operators_and_types.config`` (the operator and
    type list a minimal ONNX Runtime Mobile build needs, for ``--include_ops_by_config``).

    Args:
        source: An ONNX file (ideally the simplified one) or its :class:`ExportResult`.
        path: Output ``.ort`` file (default: beside the source, suffix ``.ort``).
        optimization_style: ``"fixed"`` (optimisations applied now, for a fixed build) or
            ``"runtime"`` (ORT applies them on device).
        target_platform: ``"arm"`` (phones) or ``"amd64"``; picks platform-specific layouts.
        overwrite: Replace existing outputs.

    Raises:
        ExportError: Bad option, or the conversion failed (the message has the cause).
    """
    ort = require_backend("onnxruntime", extra="onnx", purpose="ORT-format conversion")
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    if optimization_style not in OPTIMIZATION_STYLES:
        raise ExportError(f"Unknown optimization_style {optimization_style!r}; expected one of "
                          f"{OPTIMIZATION_STYLES}.")
    if target_platform not in TARGET_PLATFORMS:
        raise ExportError(f"Unknown target_platform {target_platform!r}; expected one of "
                          f"{TARGET_PLATFORMS}.")
    onnx_path = fspath(source.path if isinstance(source, ExportResult) else source)
    if not onnx_path.is_file():
        raise ExportError(f"ONNX model {onnx_path} does not exist.")
    path = fspath(path) if path is not None else onnx_path.with_suffix(".ort")
    config_path = path.with_suffix(".required_operators_and_types.config")
    style = {"fixed": OptimizationStyle.Fixed, "runtime": OptimizationStyle.Runtime}
    with tempfile.TemporaryDirectory(prefix="odconv_ort_") as work:
        work_in, work_out = Path(work) / "in", Path(work) / "out"
        work_in.mkdir()
        shutil.copy(onnx_path, work_in / f"{path.stem}.onnx")
        log = io.StringIO()
        tool_logger = logging.getLogger("ort_format_model.utils")  # chatty INFO lines
        level = tool_logger.level
        tool_logger.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(log):
                convert_onnx_models_to_ort(
                    work_in / f"{path.stem}.onnx", output_dir=work_out,
                    optimization_styles=[style[optimization_style]],
                    target_platform=target_platform, enable_type_reduction=True)
        except Exception as exc:
            raise ExportError(f"ORT-format conversion of {onnx_path} failed: "
                              f"{root_cause(exc)}") from exc
        finally:
            tool_logger.setLevel(level)
        produced = sorted(work_out.glob("*.ort"))
        configs = sorted(work_out.glob("*.config"))
        if len(produced) != 1 or len(configs) != 1:
            raise ExportError(f"ORT-format conversion of {onnx_path} produced "
                              f"{[p.name for p in work_out.iterdir()]}; expected one .ort and "
                              f"one .config. Log:\n{log.getvalue()[-2000:]}")
        with atomic_output(config_path, overwrite=overwrite) as tmp:
            shutil.copy(configs[0], tmp)
        with atomic_output(path, overwrite=overwrite) as tmp:
            shutil.copy(produced[0], tmp)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ops = _config_ops(config_path)

    def shapes(values: list) -> dict[str, list[int | str]]:
        return {v.name: [d if isinstance(d, int) else str(d) for d in v.shape] for v in values}

    return ExportResult(
        format=ExportFormat.ORT, path=path,
        input_names=[i.name for i in session.get_inputs()],
        output_names=[o.name for o in session.get_outputs()],
        input_shapes=shapes(session.get_inputs()), output_shapes=shapes(session.get_outputs()),
        file_size_bytes=path_size(path),
        options={"source": str(onnx_path), "optimization_style": optimization_style,
                 "target_platform": target_platform,
                 "weights": session.get_modelmeta().custom_metadata_map.get("weights")},
        tool_versions=tool_versions("onnxruntime"),
        details={"operator_config": str(config_path), "required_operators": ops},
    )


def _config_ops(config: Path) -> list[str]:
    """Operator names (``domain:Op``) listed in an ORT required-operators config."""
    ops = []
    for line in config.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        domain, _, names = line.split(";", 2)
        depth, start = 0, 0
        for i, ch in enumerate(names + ","):  # split on commas outside {...} type lists
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                op = names[start:i].split("{", 1)[0]
                if op:
                    ops.append(f"{domain}:{op}")
                start = i + 1
    return ops
