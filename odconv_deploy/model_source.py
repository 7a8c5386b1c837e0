"""Resolve what the user asked for (a zoo name, maybe a checkpoint) into a ready model."""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from odconv_deploy.checkpoint import load_checkpoint
from odconv_deploy.io_spec import IOSpec
from odconv_deploy.models import create_model, model_entry
from odconv_deploy.synthetic import synthesize_weights

#: The committed trained model (od_tinynet on scikit-learn's digits).
DIGITS_MODEL = "od_tinynet_digits"


@dataclass
class LoadedModel:
    """A model with its name, I/O spec and where its weights came from."""

    name: str
    model: nn.Module
    io_spec: IOSpec
    weights: str  # "checkpoint PATH" or "synthetic (seed N)"
    kwargs: dict[str, object]


def load_zoo_model(name: str, *, checkpoint: str | os.PathLike | None = None, seed: int = 0,
                   **kwargs: object) -> LoadedModel:
    """Build zoo model ``name`` with a checkpoint's weights, or deterministic synthetic ones.

    Args:
        name: Zoo model name.
        checkpoint: Optional checkpoint path (see :func:`load_checkpoint`).
        seed: Seed of the synthetic weights used when there is no checkpoint.
        **kwargs: Model arguments (``kernel_num``, ``num_classes``, ...).
    """
    if name == DIGITS_MODEL:
        from odconv_deploy.digits import load_digits_model

        if checkpoint is not None or kwargs:
            raise ValueError(f"{DIGITS_MODEL} is a fixed trained model; it takes no "
                             "checkpoint or model arguments.")
        model = load_digits_model()
        return LoadedModel(name, model, model.io_spec, "trained on sklearn digits", {})
    model = create_model(name, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
        weights = f"checkpoint {os.fspath(checkpoint)}"
    else:
        synthesize_weights(model, seed=seed)
        weights = f"synthetic (seed {seed})"
    model.eval()
    return LoadedModel(name, model, model.io_spec, weights, dict(kwargs))


def static_twin_of(loaded: LoadedModel, *, seed: int = 0) -> LoadedModel:
    """The static twin of a zoo model, with synthetic weights (a latency baseline)."""
    if loaded.name == DIGITS_MODEL:
        from odconv_deploy.digits import MODEL_KWARGS

        kwargs = {k: v for k, v in MODEL_KWARGS.items() if k != "kernel_num"}
        return load_zoo_model("tinynet", seed=seed, **kwargs)
    twin = model_entry(loaded.name).static_twin
    kwargs = {k: v for k, v in loaded.kwargs.items() if k != "kernel_num" and k != "reduction"}
    return load_zoo_model(twin, seed=seed, **kwargs)
