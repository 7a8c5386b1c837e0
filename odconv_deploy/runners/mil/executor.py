"""The MIL reference executor's run loop: :class:`MILExecutor` and :func:`execute_mil`.

It walks a function's MIL operations in program order, keeps a table
``var name -> np.ndarray`` and evaluates every op with its kernel from
:mod:`odconv_deploy.runners.mil.kernels`. Unknown ops fail loudly
(:class:`UnsupportedMILOpError`, raised before anything runs); no op is ever skipped.

Numerics (the documented choice; the op semantics are listed in
:mod:`odconv_deploy.runners.mil.kernels`):

- Every value is stored in the dtype its MIL var declares: ``fp16`` vars hold
  ``np.float16`` arrays, ``fp32`` vars ``np.float32``, ``int32`` vars ``np.int32``, and so on.
  Inputs are cast to the declared input dtype (iOS16+ fp16 programs take fp16 inputs).
- Float kernels read their (already rounded) inputs as ``float32``, compute in ``float32`` and
  round the result once to the output var's dtype. For element-wise ops this equals native
  fp16 arithmetic (``float32`` holds the exact fp16 result before the final rounding). For
  numerically heavy ops (conv, linear, matmul, reductions such as reduce_mean/reduce_sum,
  softmax, normalizations, pooling) it models Core ML's fp16 path, which accumulates in higher
  precision but stores fp16 tensors. Real hardware (GPU / Neural Engine) may accumulate
  differently: ``rounding`` below brackets that.
- ``rounding`` chooses the fp16 model. ``"per_op"`` (the default, optimistic) is the above.
  ``"per_term"`` (pessimistic) also accumulates in fp16 in ops with an fp16 result: conv,
  conv_transpose, linear and matmul as an fp16 running sum, one FMA per term in order (a MAC
  array accumulating in fp16; on a 2304-term conv ~35x the per-op error), avg_pool over its
  taps in order, reduce_sum / reduce_mean pairwise (a tree of fp16 adds, as GPU reductions
  sum). Softmax, normalisation statistics and einsum keep float32 sums. ``"none"`` stores
  fp16 vars in float32 (inputs too): the same program with no fp16 rounding of values, so
  that differences between the three isolate rounding from conversion errors (fp16 constants
  are used as stored).
- Flexible dims are checked for consistency between inputs, not against the ``RangeDim``
  bounds (those live in the model description, not in the MIL program).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from odconv_deploy.errors import InputShapeError
from odconv_deploy.runners.mil.kernels import (
    _KERNELS,
    MILExecutionError,
    UnsupportedMILOpError,
    _OpContext,
    _precheck,
)
from odconv_deploy.runners.mil.loader import (
    MILProgramError,
    _as_value,
    _is_int_dim,
    load_mil_program,
)

if TYPE_CHECKING:  # coremltools is an optional backend; import it only where it is used
    from coremltools.converters.mil.mil import Function, Operation, Var

__all__ = ["ROUNDINGS", "MILExecutionError", "MILExecutor", "execute_mil"]

#: The fp16 rounding models: optimistic, pessimistic, and none (see the module docstring).
ROUNDINGS = ("per_op", "per_term", "none")


# --------------------------------------------------------------------------------------------
# Executor
# --------------------------------------------------------------------------------------------


def _iter_ops(block: Any) -> Iterator[Operation]:
    for op in block.operations:
        yield op
        for inner in getattr(op, "blocks", None) or []:
            yield from _iter_ops(inner)


class MILExecutor:
    """Executes one function of a MIL program in NumPy (see the module docstring for numerics).

    Args:
        program: A MIL ``Program``, a coremltools ``MLModel`` or a path to a ``.mlpackage``
            (anything :func:`load_mil_program` accepts).
        function: Name of the function to run.
        rounding: The fp16 model: ``"per_op"``, ``"per_term"`` or ``"none"`` (see the module
            docstring); it changes nothing in an fp32 program.

    Raises:
        MILProgramError: The program has no function of that name.
        ValueError: ``rounding`` is not one of the three.
    """

    def __init__(self, program: Any, *, function: str = "main", rounding: str = "per_op"
                 ) -> None:
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding {rounding!r}: expected one of {ROUNDINGS}")
        self.rounding = rounding
        self.program = load_mil_program(program)  # raises MissingBackendError without coremltools
        from coremltools.converters.mil.mil import types

        if function not in self.program.functions:
            raise MILProgramError(f"The MIL program has no function '{function}'; it has "
                                  f"{sorted(self.program.functions)}.")
        self.function_name = function
        self._function: Function = self.program.functions[function]
        self._types = types
        self._kernels = _KERNELS

    # -- description ---------------------------------------------------------------------

    @property
    def input_names(self) -> list[str]:
        """Names of the function's inputs, in declaration order."""
        return list(self._function.inputs)

    @property
    def output_names(self) -> list[str]:
        """Names of the function's outputs, in declaration order."""
        return [v.name for v in self._function.outputs]

    @property
    def op_types(self) -> Counter[str]:
        """``op_type -> count`` over the function, nested blocks included."""
        return Counter(op.op_type for op in _iter_ops(self._function))

    def check_supported(self) -> None:
        """Raise if any op has no kernel or is refused by its kernel; nothing is executed.

        A refusal (a mode or size whose Core ML semantics are not documented, e.g.
        ``upsample_bilinear`` with ``align_corners=half_pixel_centers``) is found here from the
        op's constant parameters and static shapes; one that depends on run-time sizes is
        raised, as the same error, when the op runs.

        Raises:
            UnsupportedMILOpError: Names every unsupported op type (with counts) and lists the
                supported ones; or names every refused op with its mode and reason.
        """
        missing = {t: n for t, n in self.op_types.items() if t not in self._kernels}
        if missing:
            found = ", ".join(f"{t} (x{n})" for t, n in sorted(missing.items()))
            raise UnsupportedMILOpError(
                f"The MIL function '{self.function_name}' uses op types the reference executor "
                f"has no kernel for: {found}. Supported op types: "
                f"{', '.join(sorted(self._kernels))}."
            )
        refused = [f"'{op.name}' ({reason})" for op in _iter_ops(self._function)
                   if (reason := _precheck(op)) is not None]
        if refused:
            raise UnsupportedMILOpError(
                f"The MIL function '{self.function_name}' uses ops in modes the reference "
                f"executor refuses: {'; '.join(refused)}"
            )

    # -- execution -----------------------------------------------------------------------

    def _np_dtype(self, var: Var) -> Any:
        """The dtype ``var``'s values are stored in (fp16 as float32 when rounding is none)."""
        try:
            dtype = np.dtype(self._types.nptype_from_builtin(var.dtype))
        except (KeyError, TypeError):
            return None
        return np.dtype(np.float32) if self.rounding == "none" and dtype == np.float16 else dtype

    def _per_term(self, op: Operation) -> bool:
        return (self.rounding == "per_term" and bool(op.outputs)
                and self._np_dtype(op.outputs[0]) == np.float16)

    def _prepare_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(inputs, dict):
            raise InputShapeError(f"Inputs must be a dict name -> array; got "
                                  f"{type(inputs).__name__}.")
        expected = self._function.inputs
        unknown = sorted(set(inputs) - set(expected))
        missing = [n for n in expected if n not in inputs]
        if unknown or missing:
            raise InputShapeError(f"Input names {sorted(inputs)} do not match the program's "
                                  f"inputs {list(expected)} (missing {missing}, unknown "
                                  f"{unknown}).")
        env: dict[str, np.ndarray] = {}
        bound: dict[Any, int] = {}
        for name, var in expected.items():
            array = np.asarray(inputs[name])
            shape = tuple(var.shape)
            if array.ndim != len(shape):
                raise InputShapeError(f"Input '{name}' has shape {array.shape}; the program "
                                      f"expects rank {len(shape)} {shape}.")
            for got, want in zip(array.shape, shape, strict=True):
                if _is_int_dim(want):
                    ok = got == int(want)
                else:  # a symbol (flexible dim): consistent across inputs
                    ok = bound.setdefault(want, got) == got and got > 0
                if not ok:
                    raise InputShapeError(f"Input '{name}' has shape {array.shape}; the "
                                          f"program expects {shape}.")
            dtype = self._np_dtype(var)
            if dtype is None:
                raise InputShapeError(f"Input '{name}' has MIL type {var.sym_type}, which has no "
                                      "NumPy dtype; only tensor inputs are supported.")
            if np.issubdtype(array.dtype, np.floating) != np.issubdtype(dtype, np.floating):
                raise InputShapeError(f"Input '{name}' has dtype {array.dtype}; the program "
                                      f"expects {dtype}.")
            env[name] = array.astype(dtype, copy=False)
        return env

    def _finish(self, op: Operation, var: Var, value: Any) -> Any:
        """Cast a kernel result to ``var``'s dtype and check it against ``var``'s shape."""
        if isinstance(value, str):
            return value
        dtype = self._np_dtype(var)
        value = np.asarray(value)
        if dtype is not None and value.dtype != dtype:
            value = value.astype(dtype)
        shape = tuple(var.shape) if self._types.is_tensor(var.sym_type) else ()
        if value.ndim != len(shape) or any(
                _is_int_dim(want) and got != int(want)
                for got, want in zip(value.shape, shape, strict=True)):
            raise MILExecutionError(f"Op '{op.name}' ({op.op_type}) produced '{var.name}' of "
                                    f"shape {value.shape}; the program declares {shape}.")
        return value

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute the function on ``inputs``.

        Args:
            inputs: ``name -> array`` for every function input. Arrays are cast to the
                declared dtype (fp16 for iOS16+ fp16 programs); flexible dims take any size.

        Returns:
            ``name -> array`` for every function output, in the dtype the program declares.

        Raises:
            UnsupportedMILOpError: An op type has no kernel, or an op's mode is refused
                (checked before running; for run-time sizes, when the op runs).
            InputShapeError: Missing/unknown input names, or a shape or dtype mismatch.
            MILExecutionError: An op failed, or produced a value of the wrong shape.
        """
        self.check_supported()
        env: dict[str, Any] = self._prepare_inputs(inputs)
        ops = list(self._function.operations)
        outputs = set(self.output_names)
        last_use: dict[str, int] = {}
        for i, op in enumerate(ops):
            for value in op.inputs.values():
                for v in value if isinstance(value, (tuple, list)) else (value,):
                    last_use[v.name] = i

        def lookup(var: Var) -> Any:
            if var.name in env:
                return env[var.name]
            if var.val is not None:
                return _as_value(var.val)
            raise MILExecutionError(f"Var '{var.name}' has no value: it is not produced before "
                                    "use and is not a compile-time constant.")

        for i, op in enumerate(ops):
            try:
                result = self._kernels[op.op_type](_OpContext(op, lookup,
                                                              per_term=self._per_term(op)))
            except UnsupportedMILOpError as exc:  # a refusal decided by run-time sizes
                raise UnsupportedMILOpError(f"Op '{op.name}' ({op.op_type}) refused: "
                                            f"{exc}") from exc
            except Exception as exc:  # name the op; keep the cause chained
                raise MILExecutionError(f"Op '{op.name}' ({op.op_type}) failed: "
                                        f"{type(exc).__name__}: {exc}") from exc
            results = result if isinstance(result, (list, tuple)) else [result]
            if len(results) != len(op.outputs):
                raise MILExecutionError(f"Op '{op.name}' ({op.op_type}) produced "
                                        f"{len(results)} values; it declares {len(op.outputs)}.")
            for var, value in zip(op.outputs, results, strict=True):
                env[var.name] = self._finish(op, var, value)
            for value in op.inputs.values():  # free intermediates after their last use
                for v in value if isinstance(value, (tuple, list)) else (value,):
                    if last_use.get(v.name) == i and v.name not in outputs:
                        env.pop(v.name, None)
        return {name: env[name] for name in self.output_names}


def execute_mil(source: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Load a converted model's MIL program and execute it once.

    Args:
        source: Anything :func:`load_mil_program` accepts (``MLModel``, ``.mlpackage`` path,
            MIL ``Program``).
        inputs: ``name -> array`` for every model input.

    Returns:
        ``name -> array`` for every model output.
    """
    return MILExecutor(source).run(inputs)
