"""The format table: everything the project knows about each artifact format, in one place.

Each :class:`FormatInfo` says the file suffix, what the format is made from (``onnx`` ->
``onnx-sim`` -> ``ort``), the export target ``strategy="auto"`` chooses the layers' forms for,
the package extra it needs, the runners that validate it and, for the formats the benchmark
times, how its runtime's benchmark runner is built. The exporters, validation, the benchmark
and the CLI all read it from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from export.result import ExportError, ExportFormat, ExportResult
from odconv_deploy.quantize import INT8_STORAGE, check_precision_name
from odconv_deploy.runners import (
    CoreMLRunner,
    ExecuTorchRunner,
    MILReferenceRunner,
    OnnxRuntimeRunner,
    Runner,
)
from odconv_deploy.validation.fp16_bounds import Fp16ErrorModel
from odconv_deploy.validation.validate import Candidate

#: The runners that validate an artifact, each with its precision (and error model).
ValidationRunners = list[Candidate]
#: The precisions of the ONNX family and ExecuTorch (int8: W8A8 static convs and linears, by
#: ONNX Runtime's quantizer and the XNNPACK PT2E quantizer).
INT8_PRECISIONS = ("fp32", "int8w", "int8")


@dataclass(frozen=True)
class FormatInfo:
    """One artifact format.

    Attributes:
        format: The enum value (its ``.value`` is the CLI name).
        suffix: File suffix after the model's stem.
        description: One line for help texts and reports.
        derived_from: Formats this one is made from, in order of preference (empty: traced
            from the PyTorch model).
        extra: The ``odconv-deploy[...]`` extra that installs what it needs.
        validation_runners: Runners that execute an artifact of this format for validation.
        bench_runner: The benchmark's runner for an artifact and a thread count (None: the
            benchmark does not time this format).
        precisions: The precisions (:data:`odconv_deploy.quantize.PRECISIONS`) it is made in.
    """

    format: ExportFormat
    suffix: str
    description: str
    derived_from: tuple[ExportFormat, ...]
    extra: str
    validation_runners: Callable[[ExportResult], ValidationRunners]
    bench_runner: Callable[[ExportResult, int], Runner] | None = None
    precisions: tuple[str, ...] = ("fp32", "int8w")

    @property
    def name(self) -> str:
        """The CLI name."""
        return self.format.value

    def auto_target(self, onnx_target: str = "onnx") -> str:
        """The target ``strategy="auto"`` chooses for: ONNX family by ``onnx_target``."""
        if self.format is ExportFormat.COREML:
            return "coreml"
        if self.format is ExportFormat.EXECUTORCH:
            return "executorch"
        return onnx_target

    def path(self, out_dir: Path, stem: str) -> Path:
        """The artifact's path for model ``stem`` under ``out_dir``."""
        return Path(out_dir) / f"{stem}{self.suffix}"


def _ort_levels(tag: str) -> Callable[[ExportResult], ValidationRunners]:
    """ONNX Runtime with optimisations off and full.

    An int8 graph computes its QDQ nodes as written with optimisations off (float ops on
    dequantized values: the graph's own semantics); full fuses them into int8 kernels, held to
    the int8 rule.
    """
    def runners(result: ExportResult) -> ValidationRunners:
        int8 = _computes_int8(result)
        return [Candidate(OnnxRuntimeRunner(str(result.path), optimization=level,
                                            name=f"onnxruntime {tag} (opt {level})"),
                          "int8" if int8 and level == "full" else "fp32")
                for level in ("off", "full")]
    return runners


def _computes_int8(result: ExportResult) -> bool:
    """Whether an artifact runs int8 kernels (its recorded weight storage is ``int8``)."""
    return result.options.get("weights") == INT8_STORAGE


def _ort_file_runners(result: ExportResult) -> ValidationRunners:
    """The ``.ort`` file in ONNX Runtime (its optimisations were applied when it was made)."""
    return [Candidate(OnnxRuntimeRunner(str(result.path), name="onnxruntime (.ort format)"),
                      "int8" if _computes_int8(result) else "fp32")]


def _coreml_runners(result: ExportResult) -> ValidationRunners:
    """The MIL executor (fp16: rounded per op, and with fp16 accumulation) and Core ML predict.

    An fp16 program is checked against tolerances its own rounding spreads give
    (:class:`~odconv_deploy.validation.fp16_bounds.Fp16ErrorModel`, measured once per program).
    """
    precision = str(result.options.get("precision", "fp16"))
    path = str(result.path)
    if precision != "fp16":
        return [Candidate(MILReferenceRunner(path, name=f"coreml {precision} (MIL reference "
                                                        "executor)"), precision),
                Candidate(CoreMLRunner(path, name=f"coreml {precision} (predict)"), precision)]
    bounds = Fp16ErrorModel(path)
    return [Candidate(MILReferenceRunner(path, name="coreml fp16 (MIL, rounded per op)"),
                      precision, tolerance_for=bounds.tolerance_of("per_op")),
            Candidate(MILReferenceRunner(path, rounding="per_term",
                                         name="coreml fp16 (MIL, fp16 accumulation)"),
                      precision, tolerance_for=bounds.tolerance_of("per_term"),
                      bound_only=True),
            # a device may accumulate in fp16: predict is held to the pessimistic bound
            Candidate(CoreMLRunner(path, name="coreml fp16 (predict)"), precision,
                      tolerance_for=bounds.tolerance_of("per_term"))]


#: ONNX Runtime's idle pool threads spin by default; with several threads the benchmark turns
#: that off, for both models alike: in interleaved A/B rounds the idle session's spinning
#: threads otherwise steal the running one's cores (the measurement:
#: ``runtime_bench/results/auto_rules.md``).
def _ort_bench(name: str) -> Callable[[ExportResult, int], Runner]:
    def make(result: ExportResult, threads: int) -> Runner:
        return OnnxRuntimeRunner(result.path, threads=threads, spin=threads <= 1, name=name)
    return make


FORMATS: dict[ExportFormat, FormatInfo] = {info.format: info for info in (
    FormatInfo(ExportFormat.ONNX, ".onnx", "ONNX (opset 18, onnx.checker full check)", (),
               "onnx", _ort_levels("onnx"), precisions=INT8_PRECISIONS),
    FormatInfo(ExportFormat.ONNX_SIMPLIFIED, ".sim.onnx", "ONNX simplified with onnxsim",
               (ExportFormat.ONNX,), "onnx", _ort_levels("onnx-sim"), _ort_bench("onnx-sim"),
               INT8_PRECISIONS),
    FormatInfo(ExportFormat.ORT, ".ort", "ORT format for ONNX Runtime Mobile",
               (ExportFormat.ONNX_SIMPLIFIED, ExportFormat.ONNX), "onnx", _ort_file_runners,
               _ort_bench("ort"), INT8_PRECISIONS),
    FormatInfo(ExportFormat.COREML, ".mlpackage", "Core ML mlprogram package", (), "coreml",
               _coreml_runners, lambda r, threads: CoreMLRunner(r.path, name="coreml"),
               ("fp32", "fp16", "int8w", "lut6w")),
    FormatInfo(ExportFormat.EXECUTORCH, ".pte", "ExecuTorch program (XNNPACK)", (),
               "executorch",
               lambda r: [Candidate(ExecuTorchRunner.from_export(r, name="executorch (xnnpack)"),
                                    "int8" if _computes_int8(r) else "fp32")],
               lambda r, threads: ExecuTorchRunner.from_export(r, threads=threads, name="pte"),
               INT8_PRECISIONS),
)}

#: Formats by CLI name, in the order they are made.
FORMAT_NAMES = tuple(fmt.value for fmt in FORMATS)


def format_info(fmt: ExportFormat | str) -> FormatInfo:
    """The table entry of a format (or its CLI name).

    Raises:
        ExportError: An unknown name (the message lists the valid ones).
    """
    for info in FORMATS.values():
        if fmt in (info.format, info.name):
            return info
    raise ExportError(f"Unknown export format {fmt!r}. Note: valid formats are "
                      f"{', '.join(FORMAT_NAMES)}.")


def check_precision(precision: str, formats: list[ExportFormat]) -> None:
    """Refuse a precision that one of ``formats`` cannot be made in, before any work.

    Raises:
        ODConvDeployError: An unknown precision (the message lists the known ones).
        ExportError: Formats that do not take it (the message lists the formats that do).
    """
    check_precision_name(precision)
    refused = [fmt.value for fmt in formats if precision not in FORMATS[fmt].precisions]
    if refused:
        able = [info.name for info in FORMATS.values() if precision in info.precisions]
        raise ExportError(
            f"Precision {precision} is not made for {', '.join(refused)}: the formats that "
            f"take it are {', '.join(able)}. Note: pass --formats {','.join(able)}, or choose "
            "another --precision.")


def with_sources(formats: list[ExportFormat]) -> list[ExportFormat]:
    """``formats`` plus every format they are made from, in the table's order."""
    needed = set(formats)
    for fmt in reversed(list(FORMATS)):
        if fmt in needed:
            needed.update(FORMATS[fmt].derived_from)
    return [fmt for fmt in FORMATS if fmt in needed]


def parse_formats(text: str) -> list[ExportFormat]:
    """Parse ``"onnx,coreml"`` into formats, with a clear error on an unknown one."""
    formats = [format_info(name).format for name in (n.strip() for n in text.split(",")) if name]
    if not formats:
        raise ExportError(f"No export format given. Note: choose from {', '.join(FORMAT_NAMES)}.")
    return formats
