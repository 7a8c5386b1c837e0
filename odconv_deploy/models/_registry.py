"""Model registry: ``create_model(name, **kwargs)`` and ``list_models()``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from odconv_deploy.errors import UnknownModelError
from odconv_deploy.io_spec import IMAGENET_MEAN, IMAGENET_STD
from odconv_deploy.models.mobilenetv2 import build_mobilenetv2
from odconv_deploy.models.resnet import build_resnet
from odconv_deploy.models.tinynet import build_tinynet


@dataclass(frozen=True)
class ModelEntry:
    """A zoo entry: how to build it and which model is its static twin."""

    name: str
    builder: Callable[..., nn.Module]
    is_odconv: bool
    static_twin: str
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def _register(name: str, builder: Callable[..., nn.Module], is_odconv: bool, twin: str,
              description: str) -> None:
    _REGISTRY[name] = ModelEntry(name, builder, is_odconv, twin, description)


def _resnet(depth: int, od: bool) -> Callable[..., nn.Module]:
    if od:
        def build(*, kernel_num: int = 1, reduction: float = 0.0625, num_classes: int = 1000,
                  dropout: float = 0.1) -> nn.Module:
            return build_resnet(depth, od=True, num_classes=num_classes, dropout=dropout,
                                reduction=reduction, kernel_num=kernel_num)
    else:
        def build(*, num_classes: int = 1000, dropout: float = 0.0) -> nn.Module:
            return build_resnet(depth, od=False, num_classes=num_classes, dropout=dropout)
    return build


def _mobilenetv2(width: float, od: bool) -> Callable[..., nn.Module]:
    if od:
        def build(*, kernel_num: int = 1, reduction: float = 0.0625, num_classes: int = 1000,
                  dropout: float = 0.2, in_channels: int = 3, input_size: int = 224,
                  mean: tuple[float, ...] | None = IMAGENET_MEAN,
                  std: tuple[float, ...] | None = IMAGENET_STD) -> nn.Module:
            return build_mobilenetv2(width, od=True, num_classes=num_classes, dropout=dropout,
                                     reduction=reduction, kernel_num=kernel_num,
                                     in_channels=in_channels, input_size=input_size, mean=mean,
                                     std=std)
    else:
        def build(*, num_classes: int = 1000, dropout: float = 0.2, in_channels: int = 3,
                  input_size: int = 224, mean: tuple[float, ...] | None = IMAGENET_MEAN,
                  std: tuple[float, ...] | None = IMAGENET_STD) -> nn.Module:
            return build_mobilenetv2(width, od=False, num_classes=num_classes, dropout=dropout,
                                     in_channels=in_channels, input_size=input_size, mean=mean,
                                     std=std)
    return build


for _depth in (18, 34, 50, 101):
    _register(f"od_resnet{_depth}", _resnet(_depth, True), True, f"resnet{_depth}",
              f"ResNet-{_depth} with ODConv block convs")
    _register(f"resnet{_depth}", _resnet(_depth, False), False, f"resnet{_depth}",
              f"ResNet-{_depth} (static baseline)")
for _tag, _width in (("050", 0.5), ("075", 0.75), ("100", 1.0)):
    _register(f"od_mobilenetv2_{_tag}", _mobilenetv2(_width, True), True, f"mobilenetv2_{_tag}",
              f"MobileNetV2 {_width}x with ODConv block convs")
    _register(f"mobilenetv2_{_tag}", _mobilenetv2(_width, False), False, f"mobilenetv2_{_tag}",
              f"MobileNetV2 {_width}x (static baseline)")


def _tinynet(od: bool) -> Callable[..., nn.Module]:
    if od:
        def build(*, kernel_num: int = 1, reduction: float = 0.0625, num_classes: int = 10,
                  dropout: float = 0.0, in_channels: int = 3, width: int = 16,
                  input_size: int = 32, mean: tuple[float, ...] | None = None,
                  std: tuple[float, ...] | None = None) -> nn.Module:
            return build_tinynet(od=True, kernel_num=kernel_num, reduction=reduction,
                                 num_classes=num_classes, dropout=dropout,
                                 in_channels=in_channels, width=width, input_size=input_size,
                                 mean=mean, std=std)
    else:
        def build(*, num_classes: int = 10, dropout: float = 0.0, in_channels: int = 3,
                  width: int = 16, input_size: int = 32, mean: tuple[float, ...] | None = None,
                  std: tuple[float, ...] | None = None) -> nn.Module:
            return build_tinynet(od=False, num_classes=num_classes, dropout=dropout,
                                 in_channels=in_channels, width=width, input_size=input_size,
                                 mean=mean, std=std)
    return build


_register("od_tinynet", _tinynet(True), True, "tinynet",
          "small ODConv classifier (32x32 input) for quick runs and tests")
_register("tinynet", _tinynet(False), False, "tinynet", "small static classifier (baseline)")


def list_models(*, odconv_only: bool = False) -> list[str]:
    """Names of the zoo models (``odconv_only`` leaves out the static twins)."""
    return sorted(n for n, e in _REGISTRY.items() if e.is_odconv or not odconv_only)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``.

    Raises:
        UnknownModelError: ``name`` is not in the zoo (the message lists the valid names).
    """
    if name not in _REGISTRY:
        raise UnknownModelError(
            f"Unknown model {name!r}. Note: available models are {', '.join(list_models())}."
        )
    return _REGISTRY[name]


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build a zoo model with fresh (random) weights.

    Args:
        name: A name from :func:`list_models`.
        **kwargs: ``num_classes``, ``dropout``; for ODConv models also ``kernel_num`` and
            ``reduction``.

    Raises:
        UnknownModelError: Unknown name.
        TypeError: An argument the model does not take (the message lists those it takes).
    """
    entry = model_entry(name)
    accepted = list(inspect.signature(entry.builder).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"{name} does not take the argument(s) {unknown}. Note: it takes {accepted}."
        )
    model = entry.builder(**kwargs)
    for layer_name, module in model.named_modules():
        if hasattr(module, "layer_name"):
            module.layer_name = layer_name
    model.zoo_name = name
    return model
