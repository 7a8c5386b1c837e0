"""Inputs for validation: seeded random tensors from the I/O spec, or real images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from odconv_deploy.errors import InputShapeError, require_backend
from odconv_deploy.io_spec import IMAGE_SUFFIXES, IOSpec


def seeded_feed(io_spec: IOSpec, batch: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal inputs for every spec input; the same seed gives the same arrays."""
    return {t.name: x.numpy() for t, x in
            zip(io_spec.inputs, io_spec.sample_inputs(batch, seed=seed), strict=True)}


def validation_feeds(io_spec: IOSpec, batches: list[int] | tuple[int, ...], *, seed: int = 0,
                     image_folder: str | os.PathLike | None = None
                     ) -> dict[int, dict[str, np.ndarray]]:
    """The inputs validation feeds, per batch size: images from the folder, else seeded."""
    return {b: (image_folder_feed(image_folder, io_spec, b) if image_folder
                else seeded_feed(io_spec, b, seed=seed + b)) for b in batches}


def image_folder_feed(folder: str | os.PathLike, io_spec: IOSpec, batch: int
                      ) -> dict[str, np.ndarray]:
    """The first ``batch`` images of ``folder`` (sorted by name), preprocessed for the model.

    Images are resized to the spec's input size, scaled to [0, 1] and normalised with the
    spec's mean and std.

    Raises:
        InputShapeError: The folder has fewer than ``batch`` images, or the model has more
            than one input.
    """
    image_module = require_backend("PIL.Image", extra="report", purpose="Reading images")
    if len(io_spec.inputs) != 1:
        raise InputShapeError("Image folders feed single-input models only.")
    spec = io_spec.inputs[0]
    channels, height, width = spec.shape[1:]
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < batch:
        raise InputShapeError(f"{folder} has {len(files)} images; batch {batch} needs more "
                              f"(suffixes {IMAGE_SUFFIXES}).")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for path in files[:batch]:
        with image_module.open(path) as img:
            img = img.convert(mode).resize((width, height), image_module.BILINEAR)
            arr = np.asarray(img, dtype=np.float32).reshape(height, width, channels) / 255.0
        arrays.append(io_spec.normalise(arr).transpose(2, 0, 1))
    return {spec.name: np.stack(arrays).astype(np.float32)}


def feed_issues(feed: dict[str, np.ndarray]) -> list[str]:
    """Problems with input values: NaN/Inf."""
    issues = []
    for name, arr in feed.items():
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            issues.append(f"input {name!r} has {bad} NaN/Inf values")
    return issues
