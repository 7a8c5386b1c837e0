"""Stable names for whatever a network returns: a tensor, a tuple/list or a dict of tensors.

Exporters and runners see models that return a flat tuple of tensors. A network whose forward
returns a dict or nested containers is wrapped in :class:`FlatOutputs`, which returns its
tensors in a fixed order under the names :func:`output_names` gives them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from odconv_deploy.errors import InputShapeError


def flatten_outputs(value: object, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor in ``value``, depth first, in a stable order.

    A single tensor is ``output``; tuple/list items are ``output0``, ``output1``, ...;
    dict items keep their keys; nested containers join names with ``.`` (``p3.0``).

    Raises:
        InputShapeError: ``value`` holds something that is not a tensor (the message says what
            and where).
    """
    if isinstance(value, torch.Tensor):
        return [(prefix or "output", value)]
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (tuple, list)):
        items = [(str(i) if prefix else f"output{i}", v) for i, v in enumerate(value)]
    else:
        where = f" at {prefix!r}" if prefix else ""
        raise InputShapeError(
            f"The model returned a {type(value).__name__}{where}; expected a tensor, or a "
            "tuple/list/dict of tensors. Note: wrap the model so its forward returns tensors."
        )
    if not items:
        raise InputShapeError(f"The model returned an empty {type(value).__name__}; expected "
                              "at least one output tensor.")
    flat: list[tuple[str, torch.Tensor]] = []
    for key, item in items:
        flat += flatten_outputs(item, f"{prefix}.{key}" if prefix else key)
    return flat


def needs_flattening(value: object) -> bool:
    """Whether exporters need :class:`FlatOutputs` (anything but a tensor or flat tuple/list)."""
    if isinstance(value, torch.Tensor):
        return False
    return not (isinstance(value, (tuple, list))
                and all(isinstance(v, torch.Tensor) for v in value))


class FlatOutputs(nn.Module):
    """Wraps a network so that its forward returns a flat tuple of tensors.

    Args:
        model: The network; it stays reachable as ``.model`` (its layer names gain the
            prefix ``model.``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: D102
        return tuple(t for _, t in flatten_outputs(self.model(*inputs)))
