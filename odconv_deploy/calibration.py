"""Calibration data: the inputs an int8 export measures activation ranges on.

Three sources, one result (:class:`CalibrationSet`): a folder of images (or ``.npy`` arrays)
read through the model's preprocessing (:func:`load_calibration_folder`), arrays or tensors
from the Python API (:func:`calibration_from_data`), and, for the trained digits models, their
training split (the pipeline's default there). Calibration data is never synthetic, and never
reported as accuracy: it sets scales, the test set measures.

Everything is checked before any export starts: an empty or unreadable folder, a file that is
not an image, an image with the wrong channels or smaller than the model's input, an array of
the wrong shape each raise :class:`CalibrationError` naming the file, what it had and what the
model takes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from odconv_deploy.errors import ODConvDeployError, require_backend
from odconv_deploy.io_spec import IMAGE_SUFFIXES, IOSpec

#: The file a calibration folder may hold besides images (:data:`IMAGE_SUFFIXES`).
ARRAY_SUFFIX = ".npy"
#: How many samples a calibration uses at most (the first, sorted by file name).
DEFAULT_LIMIT = 256
#: Pillow modes read as one channel, and as three (RGBA drops alpha; grey becomes RGB, as
#: every ImageNet loader does; colour is never collapsed to grey).
_GREY_MODES = ("1", "L", "I", "I;16", "F")
_COLOUR_MODES = ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA")


class CalibrationError(ODConvDeployError, ValueError):
    """Calibration data that cannot calibrate the model."""


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed calibration inputs, one feed per sample (batch 1).

    Attributes:
        feeds: Input name -> array ``[1, ...]`` float32, per sample.
        source: Where the data came from, in words (for reports and metadata).
    """

    feeds: tuple[dict[str, np.ndarray], ...]
    source: str

    def __len__(self) -> int:
        return len(self.feeds)

    def describe(self) -> str:
        """One line: how many samples, from where."""
        return f"{len(self)} samples from {self.source}"

    def batches(self, size: int, *, whole_only: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """The samples stacked ``size`` at a time (``whole_only``: no shorter last batch)."""
        end = len(self.feeds) - size + 1 if whole_only else len(self.feeds)
        for i in range(0, max(end, 0), size):
            chunk = self.feeds[i:i + size]
            yield {name: np.concatenate([f[name] for f in chunk]) for name in chunk[0]}


def _expected(io_spec: IOSpec) -> tuple[str, tuple[int, ...]]:
    if len(io_spec.inputs) != 1:
        raise CalibrationError(
            f"A calibration folder feeds single-input models; this one takes "
            f"{len(io_spec.inputs)} inputs ({', '.join(io_spec.input_names)}). Note: pass the "
            "data from Python (calibration_from_data with one dict per sample).")
    spec = io_spec.inputs[0]
    return spec.name, tuple(spec.shape[1:])


def _read_image(path: Path, shape: tuple[int, ...], io_spec: IOSpec) -> np.ndarray:
    """One image through the model's preprocessing: ``[C, H, W]`` float32.

    Resize the shorter side to the input's and centre-crop (aspect kept), scale to [0, 1],
    normalise with the spec's mean and std. Never upscaled: calibrating on upscaled images
    measures ranges the model will not see.
    """
    image_module = require_backend("PIL.Image", extra="calibration", purpose="Reading images")
    channels, height, width = shape
    if channels not in (1, 3):
        raise CalibrationError(f"{path} is an image, and the model takes {channels} channels "
                               "(images give 1 or 3). Note: calibrate it with .npy arrays.")
    try:
        with image_module.open(path) as img:
            img.load()
            mode, size = img.mode, img.size
            if channels == 1 and mode not in _GREY_MODES:
                raise CalibrationError(
                    f"{path} is a {mode} image; the model takes 1 channel (greyscale). "
                    "Note: convert the images to greyscale first.")
            if channels == 3 and mode not in _GREY_MODES + _COLOUR_MODES:
                raise CalibrationError(f"{path} has Pillow mode {mode}; the model takes RGB.")
            if size[0] < width or size[1] < height:
                raise CalibrationError(
                    f"{path} is {size[0]}x{size[1]} pixels; the model takes {width}x{height} "
                    "and calibration images are never upscaled. Note: use images at least "
                    "that size (or .npy arrays already preprocessed).")
            img = img.convert("L" if channels == 1 else "RGB")
            scale = max(width / size[0], height / size[1])
            resized = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
            img = img.resize(resized, image_module.BILINEAR)
            left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
            img = img.crop((left, top, left + width, top + height))
            pixels = np.asarray(img, dtype=np.float32).reshape(height, width, channels) / 255.0
    except CalibrationError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a bad file
        raise CalibrationError(f"{path} could not be read as an image ({type(exc).__name__}: "
                               f"{exc}). Note: remove it or replace it.") from exc
    return io_spec.normalise(pixels).transpose(2, 0, 1)


def _read_array(path: Path, shape: tuple[int, ...]) -> list[np.ndarray]:
    """A ``.npy`` file of one preprocessed sample ``[C, H, W]`` or a stack ``[N, C, H, W]``."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises several kinds for a bad file
        raise CalibrationError(f"{path} could not be read as a .npy array ({exc}).") from exc
    return _samples(array, shape, str(path))


def _samples(array: object, shape: tuple[int, ...], where: str) -> list[np.ndarray]:
    array = np.asarray(array)
    if array.dtype.kind not in "fiu":
        raise CalibrationError(f"{where} holds {array.dtype} values; calibration takes numbers.")
    if tuple(array.shape) == shape:
        array = array[None]
    if array.ndim != len(shape) + 1 or tuple(array.shape[1:]) != shape:
        raise CalibrationError(
            f"{where} has shape {list(array.shape)}; the model's input is {list(shape)} per "
            f"sample (or [N, {', '.join(map(str, shape))}]). Note: preprocess the data the "
            "way the model expects (its size, channels and normalisation).")
    if not np.isfinite(array).all():
        raise CalibrationError(f"{where} holds NaN or Inf values.")
    return list(array.astype(np.float32))


def calibration_files(folder: str | os.PathLike) -> list[Path]:
    """The image and ``.npy`` files of a calibration folder, sorted by name.

    Raises:
        CalibrationError: The folder is missing, unreadable or holds no such file.
    """
    path = Path(folder)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise CalibrationError(f"Calibration folder {path} {what}. Note: pass a folder of "
                               "images or .npy arrays (--calibration DIR).")
    try:
        entries = sorted(p for p in path.iterdir() if p.is_file())
    except OSError as exc:
        raise CalibrationError(f"Calibration folder {path} cannot be read ({exc}).") from exc
    usable = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES + (ARRAY_SUFFIX,)]
    if not usable:
        found = sorted({p.suffix or p.name for p in entries})
        raise CalibrationError(
            f"Calibration folder {path} has no image or .npy file (found "
            f"{', '.join(found[:8]) if found else 'nothing'}). Note: it takes "
            f"{', '.join(IMAGE_SUFFIXES)} or {ARRAY_SUFFIX} files.")
    return usable


def load_calibration_folder(folder: str | os.PathLike, io_spec: IOSpec, *,
                            limit: int = DEFAULT_LIMIT) -> CalibrationSet:
    """Read up to ``limit`` calibration samples from ``folder`` (sorted by name).

    Images (:data:`IMAGE_SUFFIXES`) go through the model's preprocessing (resize, centre crop,
    mean and std of the I/O spec); ``.npy`` files hold preprocessed samples. Other files are
    ignored; subfolders are not searched.

    Raises:
        CalibrationError: The folder is missing, unreadable or has no sample; a sample is
            unreadable or does not fit the model's input.
    """
    name, shape = _expected(io_spec)
    path = Path(folder)
    usable = calibration_files(path)
    if len(io_spec.inputs[0].shape) != 4 and any(p.suffix != ARRAY_SUFFIX for p in usable):
        raise CalibrationError(f"The model's input is {list(shape)}, not an image; calibrate "
                               "it with .npy arrays.")
    samples: list[np.ndarray] = []
    for file in usable:
        if len(samples) >= limit:
            break
        samples += (_read_array(file, shape) if file.suffix.lower() == ARRAY_SUFFIX
                    else [_read_image(file, shape, io_spec)])
    samples = samples[:limit]
    return CalibrationSet(tuple({name: s[None]} for s in samples),
                          f"{path} ({len(samples)} of {len(usable)} files' samples)"
                          if len(usable) > limit else str(path))


def calibration_from_data(data: object, io_spec: IOSpec, *, source: str = "Python data",
                          limit: int | None = None) -> CalibrationSet:
    """Calibration samples from the Python API: the data hook.

    ``data`` is a :class:`CalibrationSet`; an array or tensor ``[N, ...]`` (single-input
    models); or an iterable of samples, each an array ``[...]`` / ``[n, ...]`` or a dict of
    input name to array (multi-input models). The samples must be preprocessed already.

    Raises:
        CalibrationError: No sample, or one that does not fit the model's inputs.
    """
    if isinstance(data, CalibrationSet):
        feeds = list(data.feeds)
        source = data.source
    else:
        if hasattr(data, "detach"):  # a torch tensor
            data = data.detach().cpu().numpy()
        if isinstance(data, np.ndarray) or isinstance(data, Mapping):
            data = [data]
        if not isinstance(data, Iterable):
            raise CalibrationError(f"Calibration data of type {type(data).__name__}; expected "
                                   "an array [N, ...], an iterable of samples, or dicts.")
        feeds = []
        for i, item in enumerate(data):
            feeds += _feeds_of(item, io_spec, f"{source} item {i}")
    if not feeds:
        raise CalibrationError(f"{source} holds no calibration sample. Note: int8 needs real "
                               "inputs of the model to set its activation scales.")
    if limit is not None:
        feeds = feeds[:limit]
    return CalibrationSet(tuple(feeds), source)


def _feeds_of(item: object, io_spec: IOSpec, where: str) -> list[dict[str, np.ndarray]]:
    if hasattr(item, "detach"):
        item = item.detach().cpu().numpy()
    if isinstance(item, Mapping):
        missing = [n for n in io_spec.input_names if n not in item]
        if missing:
            raise CalibrationError(f"{where} lacks input(s) {missing}; the model takes "
                                   f"{io_spec.input_names}.")
        per_input = {t.name: _samples(item[t.name].detach().cpu().numpy()
                                      if hasattr(item[t.name], "detach") else item[t.name],
                                      tuple(t.shape[1:]), f"{where}[{t.name!r}]")
                     for t in io_spec.inputs}
        counts = {len(v) for v in per_input.values()}
        if len(counts) != 1:
            raise CalibrationError(f"{where}: its inputs hold different sample counts.")
        return [{n: v[i][None] for n, v in per_input.items()} for i in range(counts.pop())]
    name, shape = _expected(io_spec)
    return [{name: s[None]} for s in _samples(item, shape, where)]


def resolve_calibration(precision: str, data: object, io_spec: IOSpec, *,
                        zoo_name: str | None = None, limit: int = DEFAULT_LIMIT
                        ) -> CalibrationSet | None:
    """The calibration an export at ``precision`` uses: None unless it is ``int8``.

    ``data`` is a folder path (:func:`load_calibration_folder`), Python data
    (:func:`calibration_from_data`) or None: then a trained digits model calibrates on its
    training split (real images the package ships), and any other model is refused.

    Raises:
        CalibrationError: int8 without calibration data, or data that cannot calibrate.
    """
    if precision != "int8":
        return None
    if isinstance(data, (str, os.PathLike)):
        return load_calibration_folder(data, io_spec, limit=limit)
    if data is not None:
        return calibration_from_data(data, io_spec, limit=limit)
    from odconv_deploy.digits import DIGITS_MODELS, load_digits_splits

    require_builtin_calibration(zoo_name)
    train = load_digits_splits(size=DIGITS_MODELS[zoo_name].size)[0]
    return calibration_from_data(
        train.images[:limit], io_spec, source=f"the sklearn digits training split (first "
        f"{min(limit, len(train.images))} of {len(train.images)} images)")


def require_builtin_calibration(zoo_name: str | None) -> None:
    """Refuse int8 without calibration data for a model that has none built in.

    Raises:
        CalibrationError: ``zoo_name`` is not a trained digits model.
    """
    from odconv_deploy.digits import DIGITS_MODELS

    if zoo_name not in DIGITS_MODELS:
        raise CalibrationError(
            "int8 needs calibration data: its activation ranges are measured on real inputs, "
            f"and {zoo_name or 'this model'} has none built in. Note: pass --calibration DIR "
            "(images the model's preprocessing reads, or .npy arrays), or use --precision "
            "int8w (no calibration).")

