"""A model's input/output contract, declared once and read by export, validation and benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

#: Image files read as model inputs (validation images, calibration folders), with Pillow.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: ImageNet normalisation used by the reference zoo.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: shape at batch 1 and dtype; axis 0 is the batch axis."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def with_batch(self, batch: int) -> tuple[int, ...]:
        """The shape at batch size ``batch``."""
        return (batch,) + tuple(self.shape[1:])


@dataclass(frozen=True)
class IOSpec:
    """Inputs, outputs and (for image models) preprocessing of a model.

    Attributes:
        inputs: Input tensors in call order.
        outputs: Output tensors in return order.
        mean: Per-channel mean subtracted from [0, 1] pixels (image models).
        std: Per-channel std dividing the centred pixels (image models).
        task: ``"classification"`` enables top-k agreement metrics.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    task: str = "classification"

    @property
    def input_names(self) -> list[str]:
        """Input names in call order."""
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """Output names in return order."""
        return [t.name for t in self.outputs]

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """[0, 1] pixels ``[..., C]`` normalised with the spec's mean and std (if it has them)."""
        if self.mean is None or self.std is None:
            return pixels
        return (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def with_input_size(self, height: int, width: int) -> IOSpec:
        """The same spec for images of another size (image models with one input)."""
        (image,) = self.inputs
        shape = tuple(image.shape[:2]) + (height, width)
        return replace(self, inputs=(replace(image, shape=shape),))

    def sample_inputs(self, batch: int = 1, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Seeded random inputs (standard normal: roughly normalised images)."""
        gen = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(t.with_batch(batch), generator=gen, dtype=t.dtype)
                     for t in self.inputs)


def image_classifier_spec(num_classes: int, *, channels: int = 3, size: int = 224,
                          mean: tuple[float, ...] | None = IMAGENET_MEAN,
                          std: tuple[float, ...] | None = IMAGENET_STD) -> IOSpec:
    """Spec of an image classifier: ``image [1, C, size, size]`` -> ``logits [1, classes]``."""
    return IOSpec(
        inputs=(TensorSpec("image", (1, channels, size, size)),),
        outputs=(TensorSpec("logits", (1, num_classes)),),
        mean=mean,
        std=std,
    )


def io_spec_to_dict(spec: IOSpec) -> dict[str, object]:
    """A plain-data form of ``spec`` (loadable with ``torch.load(weights_only=True)``)."""
    def tensors(items: tuple[TensorSpec, ...]) -> list[dict[str, object]]:
        return [{"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype)} for t in items]

    return {"inputs": tensors(spec.inputs), "outputs": tensors(spec.outputs),
            "mean": None if spec.mean is None else list(spec.mean),
            "std": None if spec.std is None else list(spec.std), "task": spec.task}


def io_spec_from_dict(data: Mapping[str, object]) -> IOSpec:
    """Inverse of :func:`io_spec_to_dict`."""
    def tensors(items: object) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t["name"], tuple(t["shape"]),
                                getattr(torch, str(t["dtype"]).removeprefix("torch.")))
                     for t in items)

    return IOSpec(tensors(data["inputs"]), tensors(data["outputs"]),
                  mean=None if data["mean"] is None else tuple(data["mean"]),
                  std=None if data["std"] is None else tuple(data["std"]), task=data["task"])
