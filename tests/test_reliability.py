"""Reliability: bad input, damaged checkpoints, unsupported settings, missing backends, output
paths and interrupted writes, and determinism. Every error is checked by its message text.

Extends (does not repeat) test_odconv_layer.py, test_checkpoint.py, test_reparameterize.py and
test_export.py. Seven bugs these tests found (dtype errors, corrupt-pickle exception types,
non-string keys, the kernel_num hint on bare layers, unchecked geometry of pasted layers, lost
install hints for onnxscript/onnxruntime) are fixed; the tests keep them fixed.
"""

import importlib
import io
import json
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import export
from export import ExportError, export_coreml, export_onnx, simplify_onnx
from export.validation import validate_artifacts
from odconv_deploy import (
    DEPLOY_STRATEGIES,
    CheckpointError,
    InputShapeError,
    MissingBackendError,
    ODConv2d,
    UnsupportedLayerError,
    convert_model,
    load_checkpoint,
)
from odconv_deploy._atomic import OutputPathError, atomic_output
from odconv_deploy.io_spec import IOSpec, TensorSpec
from tests.helpers import randomize_odconv
from tests.reference_layer import PastedODConv2d

FORMS = ["train", *DEPLOY_STRATEGIES]
SHAPE = (1, 4, 9, 7)


def _seq(seed: int = 0) -> nn.Sequential:
    """A small user network: named ODConv layer + BatchNorm, randomised, eval mode."""
    model = nn.Sequential(OrderedDict(stem=ODConv2d(4, 6, 3, padding=1, kernel_num=4),
                                      bn=nn.BatchNorm2d(6)))
    return randomize_odconv(model, seed=seed).eval()


def _form(form: str) -> tuple[nn.Module, str]:
    """The model in the given form and how its ODConv layer is named in errors."""
    model = _seq()
    if form == "train":
        return model, re.escape("ODConv2d(4, 6, kernel_size=3, stride=1, padding=1")
    return convert_model(model, strategy=form).model, "stem"


def _leftovers(folder: Path) -> list[str]:
    """Names (recursively) in ``folder`` that look like temporary or partial outputs."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if ".partial" in p.name or p.name.startswith("."))


# ============================================================================================
# Run-time input checks: train form and every deploy form.
# ============================================================================================
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("make, message", [
    (lambda: torch.randn(4, 9, 7),
     r"received a tensor of shape \(4, 9, 7\) \(rank 3\); expected rank 4 "
     r"\[batch, 4, height, width\]"),
    (lambda: torch.randn(2, 1, 4, 9, 7),
     r"received a tensor of shape \(2, 1, 4, 9, 7\) \(rank 5\); expected rank 4"),
    (lambda: torch.randn(36, 7), r"\(rank 2\); expected rank 4"),
    (lambda: torch.randn(2, 5, 9, 7),
     r"received 5 input channels \(shape \(2, 5, 9, 7\)\); expected 4\."),
    (lambda: torch.randn(2, 1, 9, 7), r"received 1 input channels .*expected 4\."),
    (lambda: torch.ones(2, 4, 9, 7, dtype=torch.int64),
     r"received dtype torch\.int64; expected torch\.float32"),
    (lambda: torch.ones(2, 4, 9, 7, dtype=torch.bool),
     r"received dtype torch\.bool; expected torch\.float32"),
    (lambda: np.zeros((2, 4, 9, 7), np.float32),
     r"expected a torch\.Tensor, received ndarray"),
], ids=["rank3", "rank5", "rank2", "channels5", "channels1", "int64", "bool", "numpy"])
def test_bad_input_at_run_time_is_input_shape_error(form, make, message):
    model, layer = _form(form)
    with pytest.raises(InputShapeError, match=f"^{layer}.*{message}"):
        with torch.no_grad():
            model(make())


@pytest.mark.parametrize("form", FORMS)
def test_good_input_still_runs_after_bad_input(form):
    model, _ = _form(form)
    with pytest.raises(InputShapeError):
        model(torch.randn(1, 3, 9, 7))
    with torch.no_grad():
        out = model(torch.randn(2, 4, 9, 7))
    assert out.shape == (2, 6, 9, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("form", FORMS)
def test_float_dtype_mismatch_is_input_shape_error(form):
    model, layer = _form(form)
    with pytest.raises(InputShapeError, match=f"^{layer}.*float64.*float32"):
        with torch.no_grad():
            model(torch.randn(1, 4, 9, 7, dtype=torch.float64))


# ============================================================================================
# Checkpoints: damaged files, non-dict payloads, other models, other kernel_num.
# ============================================================================================
def _layer(kernel_num: int = 4) -> ODConv2d:
    return ODConv2d(4, 6, 3, padding=1, kernel_num=kernel_num)


def _torch_zip_with_pickle(payload: bytes) -> bytes:
    """A real torch.save zip whose ``data.pkl`` is replaced by ``payload``."""
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src:
        entries = {i.filename: src.read(i.filename) for i in src.infolist()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name, data in entries.items():
            dst.writestr(name, payload if name.endswith("/data.pkl") else data)
    return out.getvalue()


def _not_torch_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("weights/readme.txt", "a zip archive, but not a torch.save file")
    return out.getvalue()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("content, detail", [
    (b"", r"EOFError"),
    (_not_torch_zip(), r"RuntimeError"),
    (pickle.dumps([1, 2, 3], protocol=2), r"RuntimeError: Invalid magic number"),
    (pickle.dumps([1, 2, 3], protocol=4), r"UnpicklingError: Weights only load failed"),
    (pickle.dumps(OrderedDict(weight=np.zeros(3))), r"UnpicklingError"),
    (_torch_zip_with_pickle(b"\x80\x020."), r"UnpicklingError"),  # POP on an empty stack
], ids=["empty", "zip-not-torch", "plain-pickle-list-p2", "plain-pickle-list-p4",
        "pickle-numpy",
        "zip-bad-pickle"])
def test_unreadable_files_are_checkpoint_errors(tmp_path, content, detail):
    path = tmp_path / "ckpt.pth"
    path.write_bytes(content)
    model = _layer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"^Checkpoint '.*ckpt\.pth' cannot be read "
                                              rf"\(.*{detail}.*truncated or corrupt"):
        load_checkpoint(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("content", [
    b"\x80",  # truncated after the first byte -> IndexError
    _torch_zip_with_pickle(b"\x80\x02h\x05."),  # BINGET 5 with an empty memo -> KeyError
    _torch_zip_with_pickle(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R."),  # TypeError
], ids=["one-byte-indexerror", "memo-keyerror", "rebuild-typeerror"])
def test_corrupt_files_escape_as_other_exceptions(tmp_path, content):
    path = tmp_path / "ckpt.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(_layer(), path)


@pytest.mark.parametrize("payload, message", [
    (torch.zeros(3), r"Checkpoint holds a Tensor; expected a state_dict"),
    ("weights", r"Checkpoint holds a str; expected a state_dict"),
    ((torch.zeros(1),), r"Checkpoint holds a tuple; expected a state_dict"),
    ({"state_dict": [torch.zeros(1)], "epoch": 3},
     r"Checkpoint has no tensors \(top-level keys: \['epoch', 'state_dict'\]\)"),
    ({"model": {"epoch": 3}}, r"Checkpoint has no tensors"),
], ids=["tensor", "str", "tuple", "nested-list", "nested-empty"])
def test_non_state_dict_payloads(tmp_path, payload, message):
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_layer(), path)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist or is not a file"):
        load_checkpoint(_layer(), tmp_path)


@pytest.mark.parametrize("payload", [{0: torch.zeros(3)},
                                     {0: torch.zeros(1), "weight": torch.zeros(3)}],
                         ids=["int-keys", "mixed-keys"])
def test_non_string_keys_are_checkpoint_error(tmp_path, payload):
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"^Checkpoint"):
        load_checkpoint(_layer(), path)


def _wrapped_layer(kernel_num: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(stem=_layer(kernel_num)))


@pytest.mark.parametrize("src_k, dst_k", [(4, 1), (1, 4), (4, 8)])
def test_other_kernel_num_lists_every_difference(tmp_path, src_k, dst_k):
    path = tmp_path / f"k{src_k}.pt"
    source = _wrapped_layer(src_k).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}, "epoch": 7}, path)
    model = _wrapped_layer(dst_k)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, path)
    msg = str(info.value)
    assert msg.startswith("Checkpoint does not match Sequential:")
    assert (f"stem.weight: checkpoint [{src_k}, 6, 4, 3, 3] vs model [{dst_k}, 6, 4, 3, 3]"
            in msg)
    assert msg.endswith("Note: ODConv weight shapes differ; check kernel_num.")
    head = ["stem.attention.kernel_fc.bias", "stem.attention.kernel_fc.weight"]
    if src_k == 1:
        assert "missing from the checkpoint (2):" in msg and all(h in msg for h in head)
        assert "unexpected in the checkpoint" not in msg and "shape mismatches (1):" in msg
    elif dst_k == 1:
        assert "unexpected in the checkpoint (2):" in msg and all(h in msg for h in head)
        assert "missing from the checkpoint" not in msg and "shape mismatches (1):" in msg
    else:
        assert ("stem.attention.kernel_fc.weight: checkpoint [4, 16, 1, 1] vs model "
                "[8, 16, 1, 1]") in msg
        assert "stem.attention.kernel_fc.bias: checkpoint [4] vs model [8]" in msg
        assert "shape mismatches (3):" in msg and "missing" not in msg
    # A failed load changes nothing.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_kernel_num_hint_for_a_bare_layer():
    with pytest.raises(CheckpointError, match=r"check kernel_num"):
        load_checkpoint(_layer(1), _layer(4).state_dict())


def test_checkpoint_of_a_different_model_lists_all_three_kinds():
    plain = nn.Sequential(OrderedDict(stem=nn.Conv2d(4, 6, 3, padding=1),
                                      bn=nn.BatchNorm2d(6)))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(plain, _seq().state_dict())
    msg = str(info.value)
    assert msg.startswith("Checkpoint does not match Sequential:")
    assert "missing from the checkpoint (1):\n    stem.bias" in msg
    assert "unexpected in the checkpoint (" in msg and "stem.attention.fc.weight" in msg
    assert "stem.weight: checkpoint [4, 6, 4, 3, 3] vs model [6, 4, 3, 3]" in msg


def test_long_listings_are_truncated_with_a_count():
    model = _seq()
    n = len(model.state_dict())
    assert n > 10
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, {"unrelated.weight": torch.zeros(1)})
    msg = str(info.value)
    assert f"missing from the checkpoint ({n}):" in msg
    assert f"    ... and {n - 10} more" in msg
    assert "unexpected in the checkpoint (1):\n    unrelated.weight" in msg
    assert "Note: is this checkpoint from another architecture?" in msg


# ============================================================================================
# Unsupported settings: construction, and the converter on pasted reference-style layers.
# ============================================================================================
@pytest.mark.parametrize("kwargs, message", [
    ({"kernel_size": 3, "dilation": (1, 2)},
     r"dilation=\(1, 2\) is not square\. Note: ODConv supports square dilations only"),
    ({"kernel_size": [5, 3]}, r"kernel_size=\(5, 3\) is not square"),
    ({"kernel_size": 3, "stride": (2, 1)}, r"stride=\(2, 1\) is not square"),
    ({"kernel_size": 3, "padding": (1, 0)}, r"padding=\(1, 0\) is not square"),
    ({"kernel_size": 3, "padding": "valid"},
     r"padding='valid' is not supported\. Note: give the zero padding per side as an int"),
    ({"kernel_size": 3, "padding_mode": "circular"},
     r"padding_mode='circular' is not supported\. Note: ODConv pads with zeros only"),
    ({"kernel_size": 3, "padding_mode": "replicate"}, r"padding_mode='replicate'"),
    ({"kernel_size": (3, 3, 3)}, r"kernel_size must be an int or a pair of equal ints, "
                                 r"got \(3, 3, 3\)"),
    ({"kernel_size": 3.0}, r"kernel_size must be an int or a pair of equal ints, got 3\.0"),
    ({"kernel_size": True}, r"kernel_size must be an int, got True"),
    ({"kernel_size": 3, "stride": 0}, r"stride=0 must be >= 1"),
    ({"kernel_size": 3, "padding": -1}, r"padding=-1 must be >= 0"),
    ({"kernel_size": 3, "dilation": 0}, r"dilation=0 must be >= 1"),
    ({"kernel_size": 3, "kernel_num": 0}, r"kernel_num=0 must be >= 1"),
])
def test_unsupported_construction_is_named(kwargs, message):
    with pytest.raises(UnsupportedLayerError, match=r"^ODConv2d\(4, 6, kernel_size=.*" + message):
        ODConv2d(4, 6, **kwargs)


def _set(attr, value):
    def mutate(layer):
        setattr(layer, attr, value)
    return mutate


def _replace_head(name, module):
    def mutate(layer):
        setattr(layer.attention, name, module)
    return mutate


def _del(attr):
    def mutate(layer):
        delattr(layer, attr)
    return mutate


def _weight(shape):
    def mutate(layer):
        layer.weight = nn.Parameter(torch.randn(shape))
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_set("stride", (2, 1)), r"det: stride=\(2, 1\) is not square"),
    (_set("dilation", [1, 2]), r"det: dilation=\(1, 2\) is not square"),
    (_set("padding", (0, 1)), r"det: padding=\(0, 1\) is not square"),
    (_set("padding", "valid"), r"det: padding='valid' is not supported; expected an int"),
    (_set("padding_mode", "reflect"), r"det: padding_mode='reflect'; only 'zeros'"),
    (_set("stride", 1.5), r"det: stride must be an int or a pair of equal ints, got 1\.5"),
    (_set("dilation", None), r"det: dilation must be an int or a pair of equal ints"),
    (_del("dilation"), r"det: ODConv-like layer lacks the attributes \['dilation'\]"),
    (_set("groups", 2), r"det: weight expects 4 x groups=2 input channels but attention\.fc "
                        r"takes 4"),
    (_weight((4, 6, 4, 3, 5)), r"det: kernel 3x5 is not square"),
    (_replace_head("fc", nn.Conv2d(4, 16, 1, bias=True)),
     r"det: attention\.fc has a bias; the reference has none"),
    (_replace_head("kernel_fc", nn.Conv2d(16, 3, 1)),
     r"det: attention\.kernel_fc has 3 outputs; expected 4"),
    (_replace_head("spatial_fc", nn.Conv2d(16, 9, 1, bias=False)),
     r"det: attention\.spatial_fc has no weight and bias"),
    (_replace_head("filter_fc", nn.Conv2d(8, 6, 1)),
     r"det: attention\.filter_fc\.weight has 8 inputs; the attention trunk \(attention\.fc\) "
     r"has 16 channels"),
    (lambda layer: layer.attention.update_temperature(0.0), r"det: temperature=0\.0 must be > 0"),
])
def test_converter_refuses_pasted_layer_with_bad_attributes(tmp_path, mutate, message):
    layer = PastedODConv2d(4, 6, 3, padding=1)
    mutate(layer)
    model = nn.Sequential(OrderedDict(det=layer, bn=nn.BatchNorm2d(6)))
    for strategy in DEPLOY_STRATEGIES:
        with pytest.raises(UnsupportedLayerError, match="^" + message):
            convert_model(model, strategy=strategy)
    with pytest.raises(UnsupportedLayerError, match="^" + message):
        export_onnx(model, tmp_path / "x.onnx", input_shape=SHAPE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("attr, value", [("stride", 0), ("padding", -1), ("dilation", 0)])
def test_converter_refuses_out_of_range_geometry(attr, value):
    layer = PastedODConv2d(4, 6, 3, padding=1)
    setattr(layer, attr, value)
    with pytest.raises(UnsupportedLayerError, match=rf"{attr}={value}"):
        convert_model(nn.Sequential(layer), verify=False)


# ============================================================================================
# Missing optional backends.
# ============================================================================================
@pytest.fixture
def onnx_file(tmp_path):
    return export_onnx(_seq(), tmp_path / "m.onnx", input_shape=SHAPE)


def _hide(monkeypatch, *modules):
    """Make ``modules`` unimportable (as if not installed) for the rest of the test."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_coremltools(tmp_path, monkeypatch):
    _hide(monkeypatch, "coremltools")
    with pytest.raises(MissingBackendError,
                       match=r"CoreML export needs the Python package 'coremltools'.*"
                             r"pip install 'odconv-deploy\[coreml\]'"):
        export_coreml(_seq(), tmp_path / "m.mlpackage", input_shape=SHAPE)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxsim_via_import_module(onnx_file, monkeypatch):
    real = importlib.import_module

    def fake_import(name, package=None):
        if name == "onnxsim" or name.startswith("onnxsim."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(MissingBackendError,
                       match=r"ONNX simplification needs the Python package 'onnxsim'.*"
                             r"No module named 'onnxsim'.*pip install 'odconv-deploy\[onnx\]'"):
        simplify_onnx(onnx_file)
    assert sorted(p.name for p in onnx_file.path.parent.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("call, module, extra", [
    (lambda d: export_onnx(_seq(), d / "m.onnx", input_shape=SHAPE), "onnx", "onnx"),
    (lambda d: export.export_executorch(_seq(), d / "m.pte", input_shape=SHAPE), "executorch",
     "executorch"),
], ids=["onnx", "executorch"])
def test_missing_backends_name_the_extra(tmp_path, monkeypatch, call, module, extra):
    _hide(monkeypatch, module)
    with pytest.raises(MissingBackendError,
                       match=rf"needs the Python package '{module}'.*"
                             rf"pip install 'odconv-deploy\[{re.escape(extra)}\]'"):
        call(tmp_path)
    assert _leftovers(tmp_path) == [] and not any(tmp_path.iterdir())


def test_missing_onnxscript_for_dynamo_exporter(tmp_path, monkeypatch):
    _hide(monkeypatch, "onnxscript")
    with pytest.raises(MissingBackendError,
                       match=r"needs the Python package 'onnxscript'.*"
                             r"pip install 'odconv-deploy\[onnx\]'"):
        export_onnx(_seq(), tmp_path / "m.onnx", input_shape=SHAPE, exporter="dynamo")


def test_missing_onnxscript_leaves_no_file(tmp_path, monkeypatch):
    _hide(monkeypatch, "onnxscript")
    with pytest.raises((ExportError, MissingBackendError), match=r"onnxscript"):
        export_onnx(_seq(), tmp_path / "m.onnx", input_shape=SHAPE, exporter="dynamo")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_for_simplify_check(onnx_file, monkeypatch):
    _hide(monkeypatch, "onnxruntime")
    with pytest.raises(MissingBackendError,
                       match=r"'onnxruntime'.*pip install 'odconv-deploy\[onnx\]'"):
        simplify_onnx(onnx_file)


def test_missing_onnxruntime_never_publishes_unchecked_simplification(onnx_file, monkeypatch):
    _hide(monkeypatch, "onnxruntime")
    with pytest.raises(MissingBackendError, match="onnxruntime"):
        simplify_onnx(onnx_file)
    assert not (onnx_file.path.parent / "m.sim.onnx").exists()


def test_missing_backend_error_is_an_import_error(tmp_path, monkeypatch):
    _hide(monkeypatch, "coremltools")
    with pytest.raises(ImportError):
        export_coreml(_seq(), tmp_path / "m.mlpackage", input_shape=SHAPE)
    assert issubclass(MissingBackendError, ImportError)


# ============================================================================================
# Output paths, failed exports, interrupted writes.
# ============================================================================================
def test_existing_output_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"precious")
    with pytest.raises(OutputPathError, match=r"m\.onnx already exists\. Note: pass "
                                              r"overwrite=True \(CLI: --overwrite\)"):
        export_onnx(_seq(), target, input_shape=SHAPE)
    assert target.read_bytes() == b"precious"
    result = export_onnx(_seq(), target, input_shape=SHAPE, overwrite=True)
    assert result.path == target and onnx.load(str(target)).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_existing_folder_output_is_replaced_whole_on_overwrite(tmp_path):
    target = tmp_path / "m.mlpackage"
    (target / "old").mkdir(parents=True)
    (target / "old" / "stale.bin").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="already exists"):
        with atomic_output(target) as tmp:
            tmp.mkdir()
    assert (target / "old" / "stale.bin").exists()
    with atomic_output(target, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "Manifest.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["Manifest.json"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("relative", ["blocker/m.onnx", "blocker/sub/m.onnx"])
def test_parent_that_is_a_file_is_an_output_path_error(tmp_path, relative):
    (tmp_path / "blocker").write_text("a regular file")
    with pytest.raises(OutputPathError, match=r"Cannot create the folder .*blocker"):
        export_onnx(_seq(), tmp_path / relative, input_shape=SHAPE)
    with pytest.raises(OutputPathError, match=r"Cannot create the folder"):
        with atomic_output(tmp_path / relative):
            pytest.fail("the body must not run")
    assert (tmp_path / "blocker").read_text() == "a regular file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_simplify_output_parent_that_is_a_file(onnx_file, tmp_path):
    (tmp_path / "blocker").write_text("file")
    with pytest.raises(OutputPathError, match="Cannot create the folder"):
        simplify_onnx(onnx_file, tmp_path / "blocker" / "m.sim.onnx")


class _RaisesAlways(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = _seq()

    def forward(self, x):
        raise RuntimeError("boom in forward")


class _RaisesWhenTraced(nn.Module):
    """Runs eagerly (so preparation passes) but fails inside the exporter."""

    def __init__(self):
        super().__init__()
        self.conv = _seq()

    def forward(self, x):
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            raise RuntimeError("boom while tracing")
        return self.conv(x)


@pytest.mark.parametrize("model, message", [
    (_RaisesAlways, r"fails to run on the input input\[1, 4, 9, 7\]: RuntimeError: "
                    r"boom in forward"),
    (_RaisesWhenTraced, r"ONNX export of _RaisesWhenTraced \(exporter=torchscript, opset=18\) "
                        r"failed: RuntimeError: boom while tracing"),
], ids=["forward", "trace"])
def test_failed_export_leaves_nothing(tmp_path, model, message):
    with pytest.raises(ExportError, match=message):
        export_onnx(model(), tmp_path / "m.onnx", input_shape=SHAPE)
    assert list(tmp_path.iterdir()) == []


def test_failure_after_the_file_was_written_leaves_nothing(tmp_path, monkeypatch):
    """The checker runs on the complete temporary file; its failure must not publish it."""
    def broken_checker(*args, **kwargs):
        raise onnx.checker.ValidationError("checker says no")

    monkeypatch.setattr(onnx.checker, "check_model", broken_checker)
    with pytest.raises(onnx.checker.ValidationError, match="checker says no"):
        export_onnx(_seq(), tmp_path / "m.onnx", input_shape=SHAPE)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def interrupted(model, args, f, *a, **kw):
        real_export(model, args, f, *a, **kw)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])  # half written, then Ctrl-C
        raise KeyboardInterrupt

    target = tmp_path / "m.onnx"
    monkeypatch.setattr(torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(_seq(), target, input_shape=SHAPE)
    assert list(tmp_path.iterdir()) == []
    # The same with an older file in place and overwrite=True: the old file survives.
    target.write_bytes(b"previous model")
    with pytest.raises(KeyboardInterrupt):
        export_onnx(_seq(), target, input_shape=SHAPE, overwrite=True)
    assert target.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("kind", ["file", "folder"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, ValueError])
def test_atomic_output_interrupted_in_body(tmp_path, kind, exc):
    target = tmp_path / ("m.onnx" if kind == "file" else "m.mlpackage")
    seen = []
    with pytest.raises(exc):
        with atomic_output(target) as tmp:
            seen.append(tmp)
            assert tmp.parent.parent == tmp_path and tmp.parent.name.endswith(".partial")
            assert tmp.name.endswith(target.suffix)
            if kind == "file":
                tmp.write_bytes(b"half")
            else:
                (tmp / "Data").mkdir(parents=True)
                (tmp / "Data" / "weight.bin").write_bytes(b"half")
            raise exc
    assert not target.exists() and not seen[0].exists() and not seen[0].parent.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_that_writes_nothing(tmp_path):
    with pytest.raises(OutputPathError, match=r"Nothing was written for .*m\.onnx"):
        with atomic_output(tmp_path / "m.onnx"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_failed_write_removes_the_folders_it_created_and_keeps_others(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other.txt").write_text("user file")
    with pytest.raises(ValueError):
        with atomic_output(tmp_path / "new" / "deeper" / "m.onnx") as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("export failed")
    with pytest.raises(ValueError):
        with atomic_output(tmp_path / "kept" / "m.onnx"):
            raise ValueError("export failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # no empty new/deeper
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["other.txt"]


def test_atomic_output_success_leaves_only_the_target(tmp_path):
    with atomic_output(tmp_path / "sub" / "m.sim.onnx") as tmp:
        assert tmp.name == "out.sim.onnx"
        tmp.write_bytes(b"ok")
    assert (tmp_path / "sub" / "m.sim.onnx").read_bytes() == b"ok"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["m.sim.onnx"]


# ============================================================================================
# Determinism.
# ============================================================================================
def test_onnx_export_is_byte_identical(tmp_path):
    model = _seq(seed=3)
    a = export_onnx(model, tmp_path / "a" / "m.onnx", input_shape=SHAPE)
    b = export_onnx(model, tmp_path / "b" / "m.onnx", input_shape=SHAPE)
    c = export_onnx(_seq(seed=3), tmp_path / "a" / "m.onnx", input_shape=SHAPE, overwrite=True)
    data = a.path.read_bytes()
    assert data == b.path.read_bytes() == c.path.read_bytes()
    strip = {"path"}
    assert ({k: v for k, v in a.to_dict().items() if k not in strip}
            == {k: v for k, v in b.to_dict().items() if k not in strip})


def _without_timing(value):
    """Drop every key that names a time or duration, recursively."""
    timing = re.compile(r"time|duration|elapsed|seconds|latency|_s$|_ms$", re.IGNORECASE)
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if not timing.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [_without_timing(v) for v in value]
    return value


def test_validation_figures_are_identical_twice(tmp_path):
    model = _seq(seed=4)
    spec = IOSpec(inputs=(TensorSpec("input", SHAPE),), outputs=(TensorSpec("output", ()),),
                  mean=None, std=None, task="generic")
    result = export_onnx(model, tmp_path / "m.onnx", input_shape=SHAPE)
    deploy = convert_model(model).model
    reports = [validate_artifacts(model, [result], io_spec=spec, deploy_model=deploy)
               for _ in range(2)]
    first, second = (_without_timing(r.to_dict()) for r in reports)
    assert first["passed"] and first["comparisons"]
    assert {c["runner"] for c in first["comparisons"]} >= {
        "torch (deploy form)", "onnxruntime onnx (opt off)", "onnxruntime onnx (opt full)"}
    assert {c["batch"] for c in first["comparisons"]} == {1, 3}
    assert json.dumps(first, sort_keys=True, default=str) == json.dumps(
        second, sort_keys=True, default=str)
