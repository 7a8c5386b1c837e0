"""Resolve what the user names with ``--model`` into a ready model with its I/O contract.

A model source is one of:

- a zoo name (``odconv-deploy models``), with ``--kernel-num`` for the ODConv entries and an
  optional state_dict (``--checkpoint``); ``od_tinynet_digits`` is the committed trained model;
- an import string ``package.module:callable`` (resolved from the working directory, as
  uvicorn and torch.hub resolve theirs), called with ``--model-args key=value,...``; the
  attribute may also be a module instance;
- a file: a pickled ``nn.Module`` (``torch.save(model)``), a training checkpoint that holds
  the module under ``ema`` or ``model`` (as Ultralytics saves), or the deploy checkpoint that
  ``odconv-deploy convert`` writes. Unpickling a module runs code from the file, so those need
  ``trust_pickle=True`` (CLI: ``--trust-pickle``).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from odconv_deploy.checkpoint import load_checkpoint
from odconv_deploy.conversions import DEPLOY_CHECKPOINT_KEY, restore_conversion
from odconv_deploy.digits import DIGITS_MODELS
from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.io_spec import IOSpec, TensorSpec, io_spec_from_dict
from odconv_deploy.models import create_model, list_models, model_entry
from odconv_deploy.outputs import FlatOutputs, flatten_outputs, needs_flattening
from odconv_deploy.reparameterize import ConversionResult
from odconv_deploy.synthetic import synthesize_weights

#: The committed trained model (od_tinynet on scikit-learn's digits); all of them:
#: :data:`odconv_deploy.digits.DIGITS_MODELS`.
DIGITS_MODEL = "od_tinynet_digits"
#: kernel_num of ODConv zoo models when none is given.
DEFAULT_KERNEL_NUM = 4
#: Keys under which training checkpoints keep the whole module, in order of preference.
MODULE_KEYS = ("ema", "model")

_IMPORT_STRING = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ModelSourceError(ODConvDeployError, ValueError):
    """A ``--model`` that cannot be resolved, or arguments it cannot take."""


@dataclass
class LoadedModel:
    """A model ready for conversion and export, and where it came from.

    Attributes:
        name: Name for artifacts and reports (zoo name, callable name or file stem).
        model: The network in eval mode (train form, unless the source was a deploy form).
        io_spec: Inputs (from the zoo, the model's ``io_spec`` or ``input_shape``) and outputs
            (named after what the forward returns).
        weights: Where the weights came from, in words.
        source: ``zoo``, ``import``, ``module-file`` or ``deploy-checkpoint``.
        zoo_name: The zoo entry behind the model, if any (its static twin is the zoo's).
        kwargs: Arguments the model was built with.
        recipe: How to rebuild the train form (stored in deploy checkpoints).
        conversion: A deploy checkpoint's stored conversion, its target and batch mode.
    """

    name: str
    model: nn.Module
    io_spec: IOSpec
    weights: str
    source: str = "zoo"
    zoo_name: str | None = None
    kwargs: dict[str, object] = field(default_factory=dict)
    recipe: dict[str, object] = field(default_factory=dict)
    conversion: tuple[ConversionResult, str, bool] | None = None


def zoo_names() -> list[str]:
    """Every name ``--model`` takes from the zoo: the registry and the trained digits models."""
    return list_models() + list(DIGITS_MODELS)


# -- parsing of the user's strings ------------------------------------------------------------
def _split_top_level(text: str, sep: str) -> list[str]:
    """Split at ``sep`` outside brackets and quotes (``a=(1,2),b=3`` -> two items)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_model_args(text: str | None) -> dict[str, object]:
    """``"width=32,act='silu',sizes=(1,2)"`` -> kwargs; values are Python literals or strings.

    Raises:
        ModelSourceError: An item without ``=`` or with an invalid name.
    """
    kwargs: dict[str, object] = {}
    for item in _split_top_level(text or "", ","):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ModelSourceError(
                f"--model-args item {item!r} is not key=value. Note: write e.g. "
                "--model-args num_classes=3,width=0.5")
        try:
            kwargs[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            kwargs[key] = raw.strip()  # a bare word is a string
    return kwargs


def parse_input_shapes(items: str | list[str] | tuple[str, ...] | None
                       ) -> tuple[TensorSpec, ...] | None:
    """``"1,3,640,640"`` or ``["image:1,3,224,224", "mask:1,1,224,224"]`` -> input specs.

    The first number is the batch axis and must be 1 (batch sizes are chosen by the export,
    validation and benchmark options). Items may also be separated by ``;``.

    Raises:
        ModelSourceError: A malformed shape (the message shows the expected form).
    """
    if items is None:
        return None
    if isinstance(items, str):
        items = [items]
    entries = [e for item in items for e in _split_top_level(item, ";")]
    if not entries:
        raise ModelSourceError("--input-shape is empty. Note: write e.g. --input-shape "
                               "1,3,640,640 (or name:1,3,640,640 for each of several inputs).")
    specs = []
    for i, entry in enumerate(entries):
        name, _, dims = entry.rpartition(":")
        name = name.strip() or ("input" if len(entries) == 1 else f"input{i}")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if len(shape) < 2 or any(d < 1 for d in shape) or not name.isidentifier():
            raise ModelSourceError(
                f"--input-shape {entry!r} is not a shape. Note: write positive integers "
                "separated by commas, batch first, e.g. 1,3,640,640; several inputs as "
                "name:1,3,224,224 name2:1,1,224,224.")
        if shape[0] != 1:
            raise ModelSourceError(
                f"--input-shape {entry!r} has batch {shape[0]}. Note: write 1 as the batch; "
                "batch sizes are set by --fixed-batch (exported graphs) and --batch.")
        specs.append(TensorSpec(name, shape))
    if len({s.name for s in specs}) != len(specs):
        raise ModelSourceError(f"--input-shape names repeat: {[s.name for s in specs]}.")
    return tuple(specs)


# -- I/O contract -------------------------------------------------------------------------------
def describe_io(model: nn.Module, name: str, declared: IOSpec | None,
                inputs: tuple[TensorSpec, ...] | None) -> tuple[nn.Module, IOSpec]:
    """Run ``model`` once and return it (wrapped if its outputs need names) with its I/O spec.

    Inputs come from ``inputs`` (the user's shapes), else the declared spec; outputs are named
    after what the forward returns (a declared spec's names are kept when the count matches).

    Raises:
        ModelSourceError: No input shape is known, or the forward fails at the given shape.
    """
    if inputs is None and declared is None:
        raise ModelSourceError(
            f"{name} declares no input shape. Note: pass --input-shape 1,C,H,W (Python: "
            "input_shape=(1, C, H, W)), or name:1,C,H,W for each of several inputs.")
    if declared is not None and inputs is not None:
        same = [t.shape[1] for t in inputs] == [t.shape[1] for t in declared.inputs]
        base = declared if same else IOSpec(inputs, (), mean=None, std=None, task="generic")
        spec = IOSpec(inputs, declared.outputs, mean=base.mean, std=base.std, task=base.task)
    elif declared is not None:
        spec = declared
    else:
        spec = IOSpec(inputs, (), mean=None, std=None, task="generic")
    sample = spec.sample_inputs(batch=1)
    try:
        with torch.no_grad():
            value = model.eval()(*sample)
    except Exception as exc:
        shapes = ", ".join(f"{t.name}{list(t.shape)}" for t in spec.inputs)
        raise ModelSourceError(
            f"{name} fails to run on the input {shapes}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}. Note: check "
            "--input-shape (channels and size the network takes).") from exc
    flat = flatten_outputs(value)
    if needs_flattening(value):
        model = FlatOutputs(model).eval()
    names = [n for n, _ in flat]
    if len(spec.outputs) == len(flat):
        names = spec.output_names
    outputs = tuple(TensorSpec(n, tuple(t.shape)) for n, (_, t) in zip(names, flat, strict=True))
    task = spec.task if len(outputs) == 1 else "generic"
    return model, IOSpec(spec.inputs, outputs, mean=spec.mean, std=spec.std, task=task)


# -- the sources ------------------------------------------------------------------------------
def _zoo(name: str, checkpoint: str | os.PathLike | None, kernel_num: int | None,
         kwargs: dict[str, object], seed: int) -> LoadedModel:
    if name in DIGITS_MODELS:
        from odconv_deploy.digits import load_digits_model

        if checkpoint is not None or kwargs or kernel_num is not None:
            raise ModelSourceError(
                f"{name} is a fixed trained model; it takes no --checkpoint, --kernel-num or "
                f"--model-args. Note: use {DIGITS_MODELS[name].arch} to choose them.")
        model = load_digits_model(name)
        return LoadedModel(name, model, model.io_spec, "trained on sklearn digits",
                           zoo_name=name, recipe={"kind": "zoo", "name": name, "kwargs": {}})
    entry = model_entry(name)
    if kernel_num is not None and not entry.is_odconv:
        raise ModelSourceError(
            f"{name} is a static model; it takes no --kernel-num (got {kernel_num}). "
            f"Note: ODConv models are the od_* entries of 'odconv-deploy models'.")
    if entry.is_odconv:
        kwargs = {"kernel_num": kernel_num or DEFAULT_KERNEL_NUM, **kwargs}
    try:
        model = create_model(name, **kwargs)
    except TypeError as exc:
        raise ModelSourceError(f"{exc}") from exc
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
        weights = f"checkpoint {os.fspath(checkpoint)}"
    else:
        synthesize_weights(model, seed=seed)
        weights = f"synthetic (seed {seed})"
    return LoadedModel(name, model.eval(), model.io_spec, weights, zoo_name=name,
                       kwargs=kwargs, recipe={"kind": "zoo", "name": name, "kwargs": kwargs})


@contextlib.contextmanager
def _working_directory_importable() -> Iterator[None]:
    """Put the working directory first on ``sys.path`` for the duration (as uvicorn does)."""
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def _import_callable(spec: str) -> object:
    module_name, _, attr = spec.partition(":")
    with _working_directory_importable():
        try:
            target: object = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - user code may raise anything on import
            raise ModelSourceError(
                f"--model {spec!r}: module {module_name!r} does not import "
                f"({type(exc).__name__}: {exc}). Note: the module is looked up from the "
                f"working directory {os.getcwd()} and sys.path; run from the folder that "
                "holds your package.") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelSourceError(f"--model {spec!r}: {module_name!r} has no attribute "
                                   f"{attr!r}. Note: write package.module:function_or_class.")
        target = getattr(target, part)
    return target


def _imported(spec: str, checkpoint: str | os.PathLike | None, kwargs: dict[str, object]
              ) -> LoadedModel:
    target = _import_callable(spec)
    if isinstance(target, nn.Module):
        if kwargs:
            raise ModelSourceError(f"--model {spec!r} is a module instance; it takes no "
                                   "--model-args.")
        model = target
    elif callable(target):
        try:
            model = target(**kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's builder may raise anything
            raise ModelSourceError(
                f"--model {spec!r} failed when called with {kwargs}: {type(exc).__name__}: "
                f"{exc}. Note: pass its arguments with --model-args key=value,...") from exc
        if not isinstance(model, nn.Module):
            raise ModelSourceError(
                f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module. "
                "Note: point the import string at a function or class that builds the network.")
    else:
        raise ModelSourceError(f"--model {spec!r} is a {type(target).__name__}, which is "
                               "neither callable nor an nn.Module.")
    weights = "as built by the callable"
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
        weights = f"checkpoint {os.fspath(checkpoint)}"
    name = spec.rpartition(":")[2].rpartition(".")[2]
    return LoadedModel(name, model.eval(), getattr(model, "io_spec", None), weights,
                       source="import", kwargs=kwargs,
                       recipe={"kind": "import", "spec": spec, "kwargs": kwargs})


def _read_file(path: Path, trust_pickle: bool) -> object:
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive (or, with the legacy format, a pickle: protocol 2+)
    unreadable = None if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80" else \
        f"it does not start like a torch.save file (first bytes {magic!r})"
    if unreadable is None:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as safe_exc:  # noqa: BLE001 - decided below
            text = str(safe_exc)
            if "Unsupported global" not in text and "GLOBAL" not in text:
                unreadable = f"{type(safe_exc).__name__}: {text.splitlines()[0][:200]}"
    if unreadable is not None:
        raise ModelSourceError(
            f"--model {str(path)!r} is not a model file torch can read ({unreadable}). Note: "
            "expected a torch.save file (a pickled nn.Module, a checkpoint dict, or the output "
            "of 'odconv-deploy convert').")
    if not trust_pickle:
        raise ModelSourceError(
            f"--model {str(path)!r} holds pickled Python objects (a whole nn.Module); loading "
            "it runs code from the file. Note: if you trust the file, pass --trust-pickle "
            "(Python: trust_pickle=True); the module's classes must be importable from the "
            "working directory.")
    with _working_directory_importable():
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - unpickling user classes may raise anything
            raise ModelSourceError(
                f"--model {str(path)!r} could not be unpickled ({type(exc).__name__}: {exc}). "
                "Note: the classes it was saved with must be importable from the working "
                "directory.") from exc


def _module_in(obj: object) -> tuple[nn.Module, str] | None:
    if isinstance(obj, nn.Module):
        return obj, "pickled module"
    if isinstance(obj, Mapping):
        for key in MODULE_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key], f"checkpoint['{key}']"
    return None


def _from_file(path: Path, checkpoint: str | os.PathLike | None, kernel_num: int | None,
               kwargs: dict[str, object], trust_pickle: bool, seed: int) -> LoadedModel:
    obj = _read_file(path, trust_pickle)
    if isinstance(obj, Mapping) and DEPLOY_CHECKPOINT_KEY in obj:
        if checkpoint is not None or kwargs or kernel_num is not None:
            raise ModelSourceError(
                f"{path} is a deploy checkpoint; it already fixes the model and its weights. "
                "Note: drop --checkpoint, --kernel-num and --model-args.")
        return _from_deploy_checkpoint(path, obj, trust_pickle, seed)
    found = _module_in(obj)
    if found is None:
        keys = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else []
        hint = (" It looks like a state_dict: pass the architecture as --model (a zoo name or "
                "package.module:callable) and this file as --checkpoint."
                if isinstance(obj, Mapping) else "")
        raise ModelSourceError(
            f"--model {str(path)!r} holds a {type(obj).__name__}"
            + (f" with keys {keys}" if keys else "") + f", not a model.{hint} Note: a model "
            "file is a pickled nn.Module, a dict with the module under 'ema' or 'model', or "
            "the output of 'odconv-deploy convert'.")
    if kernel_num is not None or kwargs:
        raise ModelSourceError(f"{path} holds a built module; it takes no --kernel-num or "
                               "--model-args.")
    model, where = found
    model = model.float()  # Ultralytics saves half-precision modules
    weights = f"{where} of {path.name}"
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
        weights = f"checkpoint {os.fspath(checkpoint)}"
    return LoadedModel(path.stem, model.eval(), getattr(model, "io_spec", None), weights,
                       source="module-file", recipe={"kind": "module", "module": model})


def _from_deploy_checkpoint(path: Path, data: Mapping[str, object], trust_pickle: bool,
                            seed: int) -> LoadedModel:
    recipe = dict(data["source"])
    if recipe["kind"] == "zoo":
        loaded = _zoo(str(recipe["name"]), None, None, dict(recipe["kwargs"]), seed)
    elif recipe["kind"] == "import":
        loaded = _imported(str(recipe["spec"]), None, dict(recipe["kwargs"]))
    else:
        loaded = LoadedModel(str(data["name"]), recipe["module"], None, "", source="module-file",
                             recipe=recipe)
    spec = io_spec_from_dict(data["io_spec"])
    model, _ = describe_io(loaded.model, str(data["name"]), spec, spec.inputs)
    try:
        model.load_state_dict(data["train_state_dict"])
    except RuntimeError as exc:
        raise ModelSourceError(
            f"{path}: the stored weights do not fit the model its recipe builds now "
            f"({str(exc).splitlines()[0]}). Note: was the network's code changed since "
            "'odconv-deploy convert'? Convert again.") from exc
    conversion = restore_conversion(model, data)
    return LoadedModel(str(data["name"]), model.eval(), spec,
                       f"deploy checkpoint {path.name} ({data['weights']})",
                       source="deploy-checkpoint", zoo_name=loaded.zoo_name,
                       kwargs=loaded.kwargs, recipe=recipe, conversion=conversion)


def load_model(source: str | os.PathLike | nn.Module, *,
               checkpoint: str | os.PathLike | None = None, kernel_num: int | None = None,
               model_args: str | Mapping[str, object] | None = None,
               input_shape: str | list[str] | tuple[int, ...] | None = None,
               trust_pickle: bool = False, seed: int = 0, name: str | None = None
               ) -> LoadedModel:
    """Resolve a model source into a model, its I/O spec and the record of where it came from.

    Args:
        source: A zoo name, an import string ``package.module:callable``, a model file (see
            the module docstring), or an ``nn.Module`` (then ``input_shape`` is needed unless
            it has an ``io_spec``).
        checkpoint: A state_dict for the built model (zoo or import string).
        kernel_num: kernel_num of an ODConv zoo model (default 4).
        model_args: Arguments of the zoo builder or the callable (``"k=v,..."`` or a dict).
        input_shape: Input shape(s), batch first: ``(1, 3, 640, 640)``, ``"1,3,640,640"`` or
            ``["a:1,3,8,8", "b:1,1,8,8"]``; default: the model's own spec.
        trust_pickle: Allow unpickling whole modules from a file (runs code from it).
        seed: Seed of the synthetic weights of zoo models without a checkpoint.
        name: Name for artifacts (default: derived from the source).

    Raises:
        ModelSourceError, UnknownModelError, CheckpointError: The source cannot be resolved
            (the message says what was received and what is accepted).
    """
    kwargs = dict(model_args) if isinstance(model_args, Mapping) else parse_model_args(model_args)
    if isinstance(input_shape, tuple) and all(isinstance(d, int) for d in input_shape):
        input_shape = ",".join(map(str, input_shape))
    inputs = parse_input_shapes(input_shape)  # malformed shapes fail before any loading
    if isinstance(source, nn.Module):
        loaded = LoadedModel(name or type(source).__name__, source.eval(),
                             getattr(source, "io_spec", None), "as given", source="module",
                             recipe={"kind": "module", "module": source})
    else:
        text = os.fspath(source)
        if text in zoo_names():
            loaded = _zoo(text, checkpoint, kernel_num, kwargs, seed)
        elif os.path.exists(text):
            if os.path.isdir(text):
                raise ModelSourceError(f"--model {text!r} is a folder, not a model file.")
            loaded = _from_file(Path(text), checkpoint, kernel_num, kwargs, trust_pickle, seed)
        elif _IMPORT_STRING.match(text):
            if kernel_num is not None:
                raise ModelSourceError(f"--model {text!r} takes its arguments from "
                                       "--model-args, not --kernel-num.")
            loaded = _imported(text, checkpoint, kwargs)
        else:
            raise ModelSourceError(
                f"--model {text!r} is neither a zoo model, an existing file, nor an import "
                "string. Note: zoo models are " + ", ".join(zoo_names()) + "; a file is a "
                "torch.save'd module or the output of 'odconv-deploy convert'; an import "
                "string reads package.module:callable.")
    if name:
        loaded.name = name
    if inputs is not None or loaded.io_spec is None or loaded.source != "zoo":
        declared = loaded.io_spec if isinstance(loaded.io_spec, IOSpec) else None
        loaded.model, loaded.io_spec = describe_io(loaded.model, loaded.name, declared, inputs)
    return loaded


def static_twin_of(loaded: LoadedModel, *, seed: int = 0) -> LoadedModel:
    """The latency baseline of ``loaded``: the zoo's static twin, or one derived from it.

    Zoo models have a named twin (same architecture with plain convs). Any other network gets
    a twin derived by replacing every ODConv layer with a plain conv of the same geometry
    (:func:`odconv_deploy.static_twin.derive_static_twin`). Weights are synthetic: the twin is
    for latency, not accuracy.
    """
    if loaded.zoo_name in DIGITS_MODELS:
        trained = DIGITS_MODELS[loaded.zoo_name]
        kwargs = {k: v for k, v in trained.kwargs.items() if k != "kernel_num"}
        twin = _zoo(model_entry(trained.arch).static_twin, None, None, kwargs, seed)
    elif loaded.zoo_name is not None:
        kwargs = {k: v for k, v in loaded.kwargs.items() if k not in ("kernel_num", "reduction")}
        twin = _zoo(model_entry(loaded.zoo_name).static_twin, None, None, kwargs, seed)
    else:
        from odconv_deploy.static_twin import derive_static_twin

        twin = LoadedModel(f"{loaded.name}_static", derive_static_twin(loaded.model, seed=seed),
                           loaded.io_spec, f"synthetic (seed {seed})", source="derived")
    if loaded.io_spec != twin.io_spec:  # the user's input shape, outputs named alike
        twin.model, twin.io_spec = describe_io(twin.model, twin.name, loaded.io_spec,
                                               loaded.io_spec.inputs)
    return twin
