"""Load users' checkpoints: raw state_dicts or training dicts, DataParallel/DDP prefixes."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from odconv_deploy.errors import CheckpointError

#: Keys under which training scripts commonly nest the weights.
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net")
#: Prefixes added by DataParallel / DDP / torch.compile wrappers.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class KeyReport:
    """Differences between a checkpoint and a model's state_dict."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list
    )

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shape_mismatches)

    def describe(self, limit: int = 10) -> str:
        """A readable multi-line account of the differences (first ``limit`` of each kind)."""

        def listing(title: str, items: list[str]) -> list[str]:
            if not items:
                return []
            shown = [f"    {item}" for item in items[:limit]]
            more = [f"    ... and {len(items) - limit} more"] if len(items) > limit else []
            return [f"  {title} ({len(items)}):"] + shown + more

        shapes = [f"{k}: checkpoint {list(a)} vs model {list(b)}"
                  for k, a, b in self.shape_mismatches]
        return "\n".join(listing("missing from the checkpoint", self.missing)
                         + listing("unexpected in the checkpoint", self.unexpected)
                         + listing("shape mismatches", shapes))


def read_checkpoint(path_or_state_dict: str | os.PathLike | Mapping[str, object]
                    ) -> dict[str, torch.Tensor]:
    """Return the tensor state_dict inside a checkpoint path or object.

    Accepts a raw state_dict or a training checkpoint with the weights under one of
    ``NESTED_KEYS``; strips ``module.`` / ``_orig_mod.`` prefixes.

    Raises:
        CheckpointError: Missing, truncated or corrupt file, or no state_dict inside.
    """
    source = path_or_state_dict
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise CheckpointError(f"Checkpoint {path!r} does not exist or is not a file.")
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - corrupt pickles raise almost any type
            raise CheckpointError(
                f"Checkpoint {path!r} cannot be read ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). Note: the file "
                "may be truncated or corrupt, or not a torch.save file."
            ) from exc
    if not isinstance(source, Mapping):
        raise CheckpointError(
            f"Checkpoint holds a {type(source).__name__}; expected a state_dict (a mapping "
            "of names to tensors) or a dict with one under 'state_dict'."
        )
    for key in NESTED_KEYS:
        if isinstance(source.get(key), Mapping):
            source = source[key]
            break
    bad_keys = [k for k, v in source.items() if isinstance(v, torch.Tensor)
                and not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(
            f"Checkpoint has tensors under non-string keys {bad_keys[:5]!r}; a state_dict maps "
            "parameter names (strings) to tensors."
        )
    tensors = {k: v for k, v in source.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"Checkpoint has no tensors (top-level keys: {sorted(map(str, source))[:10]}). "
            f"Note: expected a state_dict or a dict with one under {list(NESTED_KEYS)}."
        )
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def compare_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> KeyReport:
    """Missing keys, unexpected keys and shape mismatches between ``state_dict`` and ``model``."""
    expected = model.state_dict()
    report = KeyReport(
        missing=sorted(set(expected) - set(state_dict)),
        unexpected=sorted(set(state_dict) - set(expected)),
    )
    for key in sorted(set(expected) & set(state_dict)):
        if tuple(expected[key].shape) != tuple(state_dict[key].shape):
            report.shape_mismatches.append(
                (key, tuple(state_dict[key].shape), tuple(expected[key].shape)))
    return report


def load_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, object]
                    ) -> nn.Module:
    """Load a checkpoint into ``model`` strictly, with a readable error on any mismatch.

    Args:
        model: The model to fill (a zoo model or any module).
        path_or_state_dict: A ``torch.save`` file, a state_dict, or a training checkpoint
            dict (weights under ``state_dict``); ``module.`` prefixes are stripped.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        CheckpointError: The file cannot be read, or keys or shapes do not match (the message
            lists missing keys, unexpected keys and shape mismatches).
    """
    state_dict = read_checkpoint(path_or_state_dict)
    report = compare_keys(model, state_dict)
    if report:
        hint = ""
        if any((k == "weight" or k.endswith(".weight")) and len(a) == 5
               for k, a, _ in report.shape_mismatches):
            hint = " Note: ODConv weight shapes differ; check kernel_num."
        elif report.missing and report.unexpected:
            hint = " Note: is this checkpoint from another architecture?"
        raise CheckpointError(
            f"Checkpoint does not match {type(model).__name__}:\n{report.describe()}\n{hint}"
            .rstrip()
        )
    model.load_state_dict(state_dict, strict=True)
    return model
