"""Export ODConv models to the formats people ship: ONNX, CoreML, ORT, ExecuTorch.

One module per format, each a function returning an :class:`ExportResult`:
:func:`export_onnx`, :func:`simplify_onnx`, :func:`export_coreml`, :func:`export_ort`,
:func:`export_executorch`. :func:`export_formats` runs several and records failures.
"""

from export.formats import FORMAT_NAMES, FORMATS, FormatInfo, format_info, parse_formats
from export.prepare import format_layer_forms, prepare_model
from export.result import ExportError, ExportFormat, ExportResult, artifact_result
from export.run import export_formats
from export.simplify import simplify_onnx
from export.to_coreml import export_coreml
from export.to_executorch import export_executorch
from export.to_onnx import DEFAULT_OPSET, export_onnx
from export.to_ort import export_ort

__all__ = [
    "DEFAULT_OPSET",
    "FORMAT_NAMES",
    "FORMATS",
    "FormatInfo",
    "ExportError",
    "ExportFormat",
    "ExportResult",
    "artifact_result",
    "format_info",
    "format_layer_forms",
    "export_coreml",
    "export_executorch",
    "export_formats",
    "export_onnx",
    "export_ort",
    "parse_formats",
    "prepare_model",
    "simplify_onnx",
]
