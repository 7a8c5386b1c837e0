"""One verified conversion per distinct per-layer plan, shared by every step of a run.

A run converts a train-form model for several targets (PyTorch, each export format). With a
named strategy every target gets the same deploy form; with ``auto`` each target has a plan
(one form per layer), and targets with the same plan share one conversion. Export,
validation, benchmark and report all take the conversions from one :class:`Conversions`.

Deploy checkpoints (``odconv-deploy convert``) store a conversion with the train weights and
the recipe that rebuilds the network, so a later ``export``/``validate``/``bench`` of the file
gives the artifacts a direct export gives.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace

import torch
from torch import nn

from odconv_deploy._version import __version__
from odconv_deploy.detect import inspect_odconv
from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.io_spec import io_spec_to_dict
from odconv_deploy.layers.deploy import DEFAULT_STRATEGY
from odconv_deploy.layers.ort_nchwc import OrtNchwcODConv2d, ort_nchwc_block
from odconv_deploy.quantize import (
    check_precision_name,
    palettize_kernel_banks,
    quantize_kernel_banks,
    stores_int8_banks,
)
from odconv_deploy.reparameterize import (
    ConversionResult,
    LayerConversion,
    convert_model,
    find_odconv_layers,
)
from odconv_deploy.strategy_choice import (
    AUTO_STRATEGY,
    TUNE_STRATEGY,
    AutoStrategy,
    canonical_target,
    check_strategy_name,
)

#: Marker key of the deploy checkpoints that :func:`deploy_checkpoint` builds.
DEPLOY_CHECKPOINT_KEY = "odconv_deploy_checkpoint"
#: Version of the deploy checkpoint layout.
DEPLOY_CHECKPOINT_VERSION = 1


class Conversions:
    """The conversions of one train-form model with one strategy, made on first use.

    Args:
        model: The train-form network (left untouched).
        strategy: A deploy form, or ``auto`` (each target's plan from
            :class:`~odconv_deploy.strategy_choice.AutoStrategy`), or ``tune`` (each target's
            plan from :meth:`set_tuned_plan`, ``auto``'s where none was set).
        progress: Told when a conversion starts (they can take a while on large models).
        stored: A conversion made earlier (a deploy checkpoint's), with its target and batch
            mode, reused where its plan is asked for.
        precision: ``int8w`` stores every conversion's kernel banks int8
            (:func:`~odconv_deploy.quantize.quantize_kernel_banks`); other precisions leave the
            weights float32 (the exporters apply them).

    Attributes:
        performed: How many conversions this object ran (each verified in float64).
    """

    def __init__(self, model: nn.Module, strategy: str = DEFAULT_STRATEGY, *,
                 stored: tuple[ConversionResult, str, bool] | None = None,
                 progress: Callable[[str], None] = lambda _: None,
                 precision: str = "fp32") -> None:
        check_strategy_name(strategy)
        check_precision_name(precision)
        self.model = model
        self.strategy = strategy
        self.precision = precision
        self.progress = progress
        self.performed = 0
        self._specs = [inspect_odconv(layer, name) for name, layer in find_odconv_layers(model)]
        if precision in ("int8w", "lut6w") and not self._specs:
            raise ODConvDeployError(
                f"{type(model).__name__} has no ODConv layer, so {precision} has no kernel bank "
                f"to compress. Note: {precision} compresses ODConv banks only; use --precision "
                "fp32.")
        self._cache: dict[tuple[str, ...], ConversionResult] = {}
        self._tuned: dict[tuple[str, bool], tuple[str, ...]] = {}
        if stored is not None:
            result, target, dynamic_batch = stored
            if strategy == TUNE_STRATEGY and result.strategy == strategy:  # its tuned plan
                self.set_tuned_plan(target, dynamic_batch, tuple(x.form for x in result.layers))
            key = self.plan(target, dynamic_batch)
            # int8w may plan other forms than the stored conversion has (see _auto_target).
            if result.strategy == strategy and tuple(x.form for x in result.layers) == key:
                self._cache[key] = self._quantized(result)

    def _quantized(self, result: ConversionResult) -> ConversionResult:
        """``result`` with its banks stored as the precision says (the float model kept)."""
        if stores_int8_banks(self.precision):
            return replace(result, model=quantize_kernel_banks(result.model),
                           float_model=result.model)
        if self.precision == "lut6w":
            return replace(result, model=palettize_kernel_banks(result.model),
                           float_model=result.model)
        return result

    @property
    def layer_count(self) -> int:
        """How many ODConv layers the model has."""
        return len(self._specs)

    def planning_target(self, target: str) -> str:
        """The target ``auto`` plans for: ``target``, but ``onnx`` for ONNX Runtime in int8w.

        The ``ort_nchwc`` layers ``auto`` gives ONNX Runtime read a float bank (their NCHWc
        rewrite), so an int8w model takes the plain ONNX plan there.
        """
        onnxruntime = canonical_target(target, warn=False) == "onnxruntime"
        return "onnx" if stores_int8_banks(self.precision) and onnxruntime else target

    def set_tuned_plan(self, target: str, dynamic_batch: bool, forms: tuple[str, ...]) -> None:
        """The plan ``tune`` measured for ``target`` (one form per layer, in layer order)."""
        if len(forms) != len(self._specs):
            raise ODConvDeployError(f"a tuned plan of {len(forms)} forms for a model with "
                                    f"{len(self._specs)} ODConv layers")
        self._tuned[(canonical_target(target, warn=False), dynamic_batch)] = tuple(forms)

    def plan(self, target: str = "torch", dynamic_batch: bool = True) -> tuple[str, ...]:
        """The deploy form each ODConv layer takes for ``target``, in layer order."""
        tuned = self._tuned.get((canonical_target(target, warn=False), dynamic_batch))
        if self.strategy == TUNE_STRATEGY and tuned is not None:
            return tuned
        if self.strategy not in (AUTO_STRATEGY, TUNE_STRATEGY):
            return (self.strategy,) * len(self._specs)
        choice = AutoStrategy(self.planning_target(target), dynamic_batch)
        return tuple(choice.choose(spec) for spec in self._specs)

    def get(self, target: str = "torch", dynamic_batch: bool = True) -> ConversionResult:
        """The verified conversion for ``target`` (shared by every target with its plan).

        A model without ODConv layers (or already in deploy form) is returned as it is.
        """
        key = self.plan(target, dynamic_batch)
        if key not in self._cache:
            if not self._specs:
                self._cache[key] = ConversionResult(self.model.eval(), self.strategy)
            else:
                forms = ", ".join(f"{form}:{key.count(form)}" for form in sorted(set(key)))
                self.progress(f"convert {len(key)} ODConv layers ({forms}), each verified in "
                              "float64 ...")
                result = convert_model(self.model, strategy=self.strategy,
                                       target=self.planning_target(target),
                                       dynamic_batch=dynamic_batch, plan=key)
                self._cache[key] = self._quantized(result)
                self.performed += 1
        return self._cache[key]


def deploy_checkpoint(loaded: object, result: ConversionResult, *, target: str,
                      dynamic_batch: bool) -> dict[str, object]:
    """The dict ``odconv-deploy convert`` saves: conversion, train weights, rebuild recipe.

    Args:
        loaded: The :class:`~odconv_deploy.model_source.LoadedModel` that was converted.
        result: Its conversion.
        target: The target the conversion was made for.
        dynamic_batch: The batch mode it was made for.
    """
    blocks = {m.block for m in result.model.modules() if isinstance(m, OrtNchwcODConv2d)}
    return {
        DEPLOY_CHECKPOINT_KEY: DEPLOY_CHECKPOINT_VERSION,
        "odconv_deploy_version": __version__,
        "name": loaded.name, "weights": loaded.weights, "source": loaded.recipe,
        "io_spec": io_spec_to_dict(loaded.io_spec),
        "strategy": result.strategy, "target": target, "dynamic_batch": dynamic_batch,
        "layer_strategies": result.layer_forms,
        "layers": [asdict(layer) for layer in result.layers],
        # Which deploy class each layer needs to load the deploy state_dict.
        "layer_forms": {layer.name: layer.form for layer in result.layers},
        # The layout of ort_nchwc layers' weights (None: no such layer).
        "nchwc_block": next(iter(blocks), None),
        "train_state_dict": loaded.model.state_dict(),
        "state_dict": result.model.state_dict(),
    }


def restore_conversion(model: nn.Module, data: Mapping[str, object]
                       ) -> tuple[ConversionResult, str, bool]:
    """Rebuild a deploy checkpoint's conversion of ``model`` and load its deploy weights.

    The layers get the recorded forms (without a second float64 verification: the record of
    the one made at conversion is kept), then the stored deploy state_dict is loaded strictly.

    Raises:
        ODConvDeployError: The checkpoint's NCHWc layout is not this CPU's, or the stored
            deploy weights do not fit.
    """
    block = data.get("nchwc_block")
    if block is not None and block != ort_nchwc_block():
        raise ODConvDeployError(
            f"The deploy checkpoint's ort_nchwc layers are laid out for NCHWc block {block}; "
            f"this CPU's onnxruntime uses {ort_nchwc_block()}. Note: convert again on this "
            "machine, or with a target other than onnxruntime.")
    target = canonical_target(str(data["target"]), warn=False)
    dynamic_batch = bool(data["dynamic_batch"])
    result = convert_model(model, strategy=str(data["strategy"]), target=target,
                           dynamic_batch=dynamic_batch, verify=False)
    try:
        result.model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ODConvDeployError(
            f"The deploy checkpoint's weights do not fit the converted model "
            f"({str(exc).splitlines()[0]}). Note: convert again with this version.") from exc
    result.layers = [LayerConversion(**_renamed(layer)) for layer in data["layers"]]
    return result, target, dynamic_batch


def _renamed(layer: Mapping[str, object]) -> dict[str, object]:
    """A stored layer record with the field names of today (``strategy`` became ``form``)."""
    record = dict(layer)
    if "strategy" in record:  # deploy checkpoints written before 0.2
        record["form"] = record.pop("strategy")
    return record


def save_deploy_checkpoint(path: str | os.PathLike, loaded: object, result: ConversionResult,
                           *, target: str, dynamic_batch: bool, overwrite: bool = False) -> None:
    """Write :func:`deploy_checkpoint` to ``path`` atomically."""
    from odconv_deploy._atomic import atomic_output

    data = deploy_checkpoint(loaded, result, target=target, dynamic_batch=dynamic_batch)
    with atomic_output(path, overwrite=overwrite) as tmp:
        torch.save(data, tmp)
