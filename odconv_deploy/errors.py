"""Exceptions raised by odconv-deploy.

Every message follows one shape: what was received, then what was expected or what to do.
All inherit from :class:`ODConvDeployError` so callers can catch the family at once.
"""

from __future__ import annotations


class ODConvDeployError(Exception):
    """Base class of every error this package raises on purpose."""


class UnknownModelError(ODConvDeployError, KeyError):
    """A model name that is not in the zoo."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class UnsupportedLayerError(ODConvDeployError, ValueError):
    """A layer setting that the reference ODConv (or this package) does not support."""


class InputShapeError(ODConvDeployError, ValueError):
    """A tensor given to a layer or model has the wrong rank, channel count or dtype."""


class CheckpointError(ODConvDeployError, ValueError):
    """A checkpoint that cannot be read or does not match the model."""


class ConversionError(ODConvDeployError, RuntimeError):
    """The deploy form of a layer did not reproduce the train form."""


class MissingBackendError(ODConvDeployError, ImportError):
    """An optional backend package is not installed."""


def require_backend(module: str, *, extra: str, purpose: str) -> object:
    """Import an optional backend, or raise :class:`MissingBackendError` saying how to get it.

    Args:
        module: Importable module name, e.g. ``"onnxruntime"``.
        extra: The ``odconv-deploy`` extra that installs it, e.g. ``"onnx"``.
        purpose: What the caller needs it for, used in the message.

    Returns:
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingBackendError(
            f"{purpose} needs the Python package '{module}', which is not installed ({exc}). "
            f"Note: install it with: pip install 'odconv-deploy[{extra}]'"
        ) from exc
