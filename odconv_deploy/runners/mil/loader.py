"""Reading a converted CoreML model's MIL program (part of the MIL reference executor).

:func:`load_mil_program` turns a coremltools ``MLModel``, a saved ``.mlpackage`` or a MIL
``Program`` into the ``Program`` the executor walks; :func:`_as_value` and
:func:`_is_int_dim` read the program's values and declared dims. See
:mod:`odconv_deploy.runners.mil` for what the executor proves.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from odconv_deploy.errors import ODConvDeployError, require_backend

if TYPE_CHECKING:  # coremltools is an optional backend; import it only where it is used
    from coremltools.converters.mil.mil import Program

__all__ = ["MILProgramError", "load_mil_program"]


class MILProgramError(ODConvDeployError, ValueError):
    """A source that is not a loadable ML Program, or a function that it does not contain."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

#: Where an ``.mlpackage`` keeps the weight blobs of an ML Program.
_WEIGHTS_SUBDIR = os.path.join("Data", "com.apple.CoreML", "weights")


def _coremltools() -> Any:
    return require_backend("coremltools", extra="coreml", purpose="The MIL reference executor")


def _program_from_spec(spec: Any, weights_dir: str, what: str) -> Program:
    if spec.WhichOneof("Type") != "mlProgram":
        raise MILProgramError(
            f"{what} is a '{spec.WhichOneof('Type')}' model; expected an ML Program "
            "(convert with convert_to='mlprogram')."
        )
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    return milproto_load(spec, spec.specificationVersion, weights_dir)


def load_mil_program(source: Any) -> Program:
    """The MIL program of a converted CoreML model.

    Args:
        source: A coremltools ``MLModel`` (its in-memory ``_mil_program`` is used when present,
            otherwise its spec and weights are read), a path to a saved ``.mlpackage``, or a
            MIL ``Program`` (returned unchanged).

    Returns:
        The ``coremltools.converters.mil.mil.Program``. For a path, the spec is read with
        ``MLModel(path, skip_model_load=True)`` (works on Linux) and the program is rebuilt
        with coremltools' milproto loader, weights resolved from the package's
        ``Data/com.apple.CoreML/weights`` folder.

    Raises:
        MILProgramError: The path does not exist, or the model is not an ML Program.
        MissingBackendError: coremltools is not installed.
    """
    ct = _coremltools()
    from coremltools.converters.mil.mil import Program

    if isinstance(source, Program):
        return source
    if isinstance(source, ct.models.MLModel):
        program = getattr(source, "_mil_program", None)
        if program is not None:
            return program
        weights_dir = getattr(source, "weights_dir", None) or ""
        return _program_from_spec(source.get_spec(), weights_dir, "The MLModel")
    if not isinstance(source, (str, os.PathLike)):
        raise MILProgramError(
            f"Cannot load a MIL program from {type(source).__name__}; expected a coremltools "
            "MLModel, a MIL Program or a path to a .mlpackage."
        )
    path = os.fspath(source)
    if not os.path.exists(path):
        raise MILProgramError(f"No CoreML model at '{path}'; expected a saved .mlpackage.")
    model = ct.models.MLModel(path, skip_model_load=True)
    weights_dir = os.path.join(path, _WEIGHTS_SUBDIR)
    if not os.path.isdir(weights_dir):
        weights_dir = getattr(model, "weights_dir", None) or ""
    return _program_from_spec(model.get_spec(), weights_dir, f"'{path}'")


# --------------------------------------------------------------------------------------------
# Values: how the program's values and declared dims are read
# --------------------------------------------------------------------------------------------


def _as_value(value: Any) -> Any:
    """A MIL value as a NumPy array (strings stay strings)."""
    if isinstance(value, str):
        return value
    return np.asarray(value)


def _is_int_dim(d: Any) -> bool:
    return isinstance(d, (int, np.integer))
