"""Turn export results into the runners that can execute them, and validate them all."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from export.formats import FORMATS
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.model_source import describe_io, parse_input_shapes
from odconv_deploy.runners import BackendUnavailableError, Runner, TorchRunner
from odconv_deploy.validation.validate import Candidate, ValidationReport, validate


def candidates_for(results: Sequence[object], *, deploy_model: nn.Module | None = None,
                   io_spec: IOSpec | None = None) -> list[Candidate]:
    """Every runner that can execute each artifact (plus the PyTorch deploy form if given).

    The runners of each format come from the format table (:data:`export.formats.FORMATS`):
    ONNX models run in ONNX Runtime with graph optimisations off and full; ``.ort`` files in
    ONNX Runtime; ``.pte`` in ExecuTorch; ``.mlpackage`` in the MIL reference executor and,
    on macOS, in Core ML itself. Failed exports are left out (their failure is reported by
    the export step).
    """
    found: list[Candidate] = []
    if deploy_model is not None:
        found.append(Candidate(TorchRunner(deploy_model, io_spec, name="torch (deploy form)"),
                               "fp32"))
    for result in results:
        if result.ok:
            found += [Candidate(runner, precision)
                      for runner, precision in FORMATS[result.format].validation_runners(result)]
    return found


def validate_artifacts(model: nn.Module, results: Sequence[object], *,
                       io_spec: IOSpec | None = None,
                       input_shape: tuple[int, ...] | None = None,
                       deploy_model: nn.Module | None = None, batches: Sequence[int] = (1, 3),
                       seed: int = 0, image_folder: str | None = None,
                       progress: Callable[[str], None] = lambda _: None) -> ValidationReport:
    """Check every artifact (and the deploy form) against the PyTorch model ``model``.

    The I/O spec is ``io_spec``, else the model's own or one for ``input_shape`` (as the
    exporters take it), with the outputs named after what the model returns.
    """
    if io_spec is None:
        declared = getattr(model, "io_spec", None)
        inputs = None if input_shape is None else parse_input_shapes(
            ",".join(map(str, (1, *input_shape[1:]))))
        model, io_spec = describe_io(model, type(model).__name__,
                                     declared if isinstance(declared, IOSpec) else None, inputs)
    reference = TorchRunner(model, io_spec, name="torch (train form)")
    return validate(reference, candidates_for(results, deploy_model=deploy_model,
                                              io_spec=io_spec),
                    io_spec, batches=batches, seed=seed, image_folder=image_folder,
                    progress=progress)


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

    Runs in chunks of ``batch`` (use 1 for artifacts with a fixed batch).
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
    for cand in candidates:
        try:
            with cand.runner:
                pred = predictions(cand.runner)
        except BackendUnavailableError as exc:
            rows.append(AccuracyRow(cand.runner.name, None, None, skipped=str(exc)))
            continue
        rows.append(AccuracyRow(cand.runner.name, float((pred == labels).mean()),
                                float((pred == truth).mean())))
    return rows
