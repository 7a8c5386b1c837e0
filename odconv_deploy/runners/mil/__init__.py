"""Reference executor for CoreML ML Programs: run the MIL program op by op in NumPy.

CoreML's ``predict`` needs macOS. This package lets Linux users check that a converted
``mlprogram`` computes the right numbers: it walks the program's MIL operations in program
order, keeps a table ``var name -> np.ndarray`` and evaluates every op with a small NumPy
kernel (a dict ``op_type -> function``). Unknown ops fail loudly
(:class:`UnsupportedMILOpError`, raised before anything runs); no op is ever skipped.

What it proves, and what it does not: a match shows that the converted program computes the
PyTorch function under Core ML's op semantics as modelled here (the kernels follow
coremltools' MIL op definitions and op tests, and refuse what those leave undocumented). It
does not catch bugs in the Core ML runtime itself, nor differences between compute units
(CPU, GPU, Neural Engine), which may pick other kernels, accumulate differently or round
elsewhere. fp16 is bracketed: one rounding per op (inputs read as stored, computed in float32,
the result rounded once; optimistic) and fp16 accumulation (running sums rounded after every
term; pessimistic), see ``MILExecutor(rounding=...)``.

Modules, each importing only the ones below it:

- :mod:`~odconv_deploy.runners.mil.executor`: :class:`MILExecutor`, :func:`execute_mil`, the
  run loop and the numerics (dtypes, fp16 rounding).
- :mod:`~odconv_deploy.runners.mil.kernels`: the op kernels, the kernel table
  (:data:`SUPPORTED_OPS`) and the op semantics they model.
- :mod:`~odconv_deploy.runners.mil.loader`: :func:`load_mil_program`, reading the program from
  an ``MLModel``, a ``.mlpackage`` or a MIL ``Program``.

Typical use::

    from odconv_deploy.runners.mil import execute_mil
    outputs = execute_mil(mlmodel_or_mlpackage_path, {"image": batch})  # {"logits": array}
"""

from odconv_deploy.runners.mil.executor import (
    ROUNDINGS,
    MILExecutionError,
    MILExecutor,
    execute_mil,
)
from odconv_deploy.runners.mil.kernels import SUPPORTED_OPS, UnsupportedMILOpError
from odconv_deploy.runners.mil.loader import MILProgramError, load_mil_program

__all__ = [
    "ROUNDINGS",
    "SUPPORTED_OPS",
    "MILExecutionError",
    "MILExecutor",
    "MILProgramError",
    "UnsupportedMILOpError",
    "execute_mil",
    "load_mil_program",
]
