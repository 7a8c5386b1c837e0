"""The 0.1 spellings renamed for one name per idea still work for one release, and say so.

Formats name files (``ort`` is the ``.ort`` file), targets name runtimes (``onnxruntime``,
``executorch``), ``--fixed-batch N`` is the one batch-mode flag, and a layer's deploy form is
its ``form``. Each old spelling must give what the new one gives, with a message naming it.
"""

import warnings

import pytest
import torch

from odconv_deploy.cli import _resolve_batch_mode, build_parser, main
from odconv_deploy.strategy_choice import AutoStrategy, canonical_target
from runtime_bench.bench_formats import renamed_backends


def _parsed(argv, capsys):
    args = build_parser().parse_args(argv)
    _resolve_batch_mode(args)
    return args, capsys.readouterr().err


@pytest.mark.parametrize("old, new", [
    (["export", "--model", "m", "--out", "o", "--static-batch", "--batch-size", "4"],
     ["export", "--model", "m", "--out", "o", "--fixed-batch", "4"]),
    (["validate", "--model", "m", "--static-batch"],
     ["validate", "--model", "m", "--fixed-batch", "1"]),
    (["bench", "--model", "m", "--static-batch", "--batch", "3,1"],
     ["bench", "--model", "m", "--fixed-batch", "3", "--batch", "3,1"]),
    (["convert", "--model", "m", "--out", "d.pt", "--static-batch"],
     ["convert", "--model", "m", "--out", "d.pt", "--fixed-batch", "1"]),
])
def test_static_batch_is_fixed_batch(old, new, capsys):
    old_args, err = _parsed(old, capsys)
    assert "--static-batch is deprecated" in err and "use --fixed-batch N" in err
    new_args, err = _parsed(new, capsys)
    assert "deprecated" not in err
    assert (old_args.dynamic_batch, old_args.fixed_batch) == (
        new_args.dynamic_batch, new_args.fixed_batch) == (False, int(new[new.index(
            "--fixed-batch") + 1]))


def test_fixed_batch_and_old_batch_size_must_agree(capsys):
    assert main(["export", "--model", "od_tinynet", "--out", "never", "--fixed-batch", "2",
                 "--batch-size", "3"]) == 3
    assert "--fixed-batch 2 and --batch-size 3 disagree" in capsys.readouterr().err


@pytest.mark.parametrize("argv, dest, old, new", [
    (["export", "--model", "m", "--out", "o", "--onnx-target"], "onnx_target", "ort",
     "onnxruntime"),
    (["convert", "--model", "m", "--out", "d.pt", "--target"], "target", "ort", "onnxruntime"),
    (["convert", "--model", "m", "--out", "d.pt", "--target"], "target", "pte", "executorch"),
])
def test_old_target_names(argv, dest, old, new, capsys):
    args, err = _parsed(argv + [old], capsys)
    assert getattr(args, dest) == new
    assert f"{argv[-1]} {old} is deprecated" in err and f"use {argv[-1]} {new}" in err


@pytest.mark.parametrize("command, dest, flag", [("bench", "formats", "--formats"),
                                                  ("run", "bench_formats", "--bench-formats")])
def test_backends_is_bench_formats(command, dest, flag, capsys):
    args, err = _parsed([command, "--model", "m", "--backends", "ort,ort-format,pte,torch"],
                        capsys)
    assert getattr(args, dest) == "onnx-sim,ort,pte,torch"
    assert "--backends is deprecated" in err and f"use {flag}" in err


def test_renamed_backends_maps_only_the_renamed_names():
    assert renamed_backends("ort, ort-format,coreml") == "onnx-sim,ort,coreml"


def test_python_api_old_targets_warn_and_choose_the_same_forms():
    with pytest.warns(DeprecationWarning, match="target 'ort' is deprecated.*'onnxruntime'"):
        old = AutoStrategy("ort", dynamic_batch=False)
    assert old == AutoStrategy("onnxruntime", dynamic_batch=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert canonical_target("pte", warn=False) == "executorch"  # a name read from a file
        assert canonical_target("coreml") == "coreml"


def test_deploy_checkpoint_written_by_0_1_still_loads(tmp_path):
    """0.1 wrote ``target: "pte"`` and layer records with ``strategy``; both still load."""
    from odconv_deploy.model_source import load_model

    new = tmp_path / "new.pt"
    assert main(["convert", "--model", "od_tinynet", "--kernel-num", "2", "--strategy", "auto",
                 "--target", "executorch", "--out", str(new)]) == 0
    data = torch.load(new, weights_only=False)
    data["target"] = "pte"
    data["layers"] = [{("strategy" if k == "form" else k): v for k, v in layer.items()}
                      for layer in data["layers"]]
    old = tmp_path / "old.pt"
    torch.save(data, old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user typed nothing deprecated: no warning
        loaded = load_model(str(old))
    result, target, _ = loaded.conversion
    assert target == "executorch"
    assert [layer.form for layer in result.layers] == [
        layer["strategy"] for layer in data["layers"]]
    assert "depthwise_taps" in {layer.form for layer in result.layers}
