"""The CLI and the README's promises."""

import re
from pathlib import Path

import pytest
import torch

from odconv_deploy.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_readme_first_lines_are_the_two_commands_and_ci_runs_the_second():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[3].endswith("odconv-deploy run") and "torch==2.13.0" in lines[3]
    assert lines[4].endswith("python -m pytest -q") and "torch==2.13.0" in lines[4]
    assert lines[4] in (ROOT / ".ci" / "run").read_text()


def test_models_lists_zoo(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"od_resnet18\s+1\s+11\.94M\s+1\.827G\s+resnet18", out)
    assert re.search(r"resnet18\s+-\s+11\.69M\s+1\.814G", out)


def test_convert_writes_checkpoint_and_refuses_overwrite(tmp_path, capsys):
    out = tmp_path / "deploy.pt"
    args = ["convert", "--model", "od_mobilenetv2_050", "--kernel-num", "2", "--out", str(out)]
    assert main(args) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["strategy"] == "im2col" and saved["source"]["kwargs"]["kernel_num"] == 2
    assert main(args) == 3
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_unknown_model_exit_code(tmp_path, capsys):
    assert main(["convert", "--model", "nope", "--out", str(tmp_path / "x.pt")]) == 3
    assert "zoo models are" in capsys.readouterr().err


def test_export_cli_fixed_batch_size(tmp_path, capsys):
    import onnx

    args = ["export", "--model", "od_tinynet", "--formats", "onnx", "--out", str(tmp_path)]
    assert main(args + ["--fixed-batch", "0"]) == 2
    assert not list(tmp_path.iterdir())
    assert main(args + ["--fixed-batch", "4"]) == 0
    graph = onnx.load(str(tmp_path / "od_tinynet.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4


def test_export_cli_one_line_per_artifact(tmp_path, capsys):
    args = ["export", "--model", "od_tinynet", "--formats", "onnx,ort", "--out", str(tmp_path)]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines] == ["onnx", "onnx-sim", "ort", "export"]
    assert lines[-1].startswith("export done (log: ")
    assert (tmp_path / "od_tinynet.ort").is_file()
    before = (tmp_path / "od_tinynet.onnx").stat().st_mtime_ns
    assert main(args) == 3  # existing artifacts are refused before any work
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "od_tinynet.onnx").stat().st_mtime_ns == before
    assert main(["export", "--model", "od_tinynet", "--formats", "tflite", "--out",
                 str(tmp_path)]) == 3
    assert "valid formats are" in capsys.readouterr().err


def test_export_cli_onnx_target_ort_runs_nchwc_kernels_and_validates(tmp_path, capsys):
    import onnx

    from odconv_deploy.layers.ort_nchwc import BLOCK_METADATA_KEY, NCHWC_DOMAIN, ort_nchwc_block

    block = ort_nchwc_block()
    if block is None:
        pytest.skip("this onnxruntime has no NCHWc kernels")
    model = ["--model", "od_mobilenetv2_050", "--kernel-num", "2", "--strategy", "auto"]
    assert main(["export", *model, "--formats", "onnx", "--out", str(tmp_path),
                 "--fixed-batch", "1", "--onnx-target", "onnxruntime"]) == 0
    proto = onnx.load(str(tmp_path / "od_mobilenetv2_050.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[BLOCK_METADATA_KEY] == str(block)
    # Every ort_nchwc layer's conv runs the NCHWc op (all 51 layers), and so does the static
    # stem (3 channels), where the chain of blocked maps starts.
    layers = dict(item.split(":") for item in meta["layer_strategies"].split(","))
    nchwc_convs = sum(n.domain == NCHWC_DOMAIN and n.op_type == "Conv" for n in proto.graph.node)
    assert nchwc_convs == int(layers["ort_nchwc"]) + 1 == 52
    capsys.readouterr()
    assert main(["validate", *model, "--onnx", str(tmp_path / "od_mobilenetv2_050.onnx"),
                 "--batch", "1", "--fixed-batch", "1"]) == 0
    assert "FAIL" not in capsys.readouterr().out
    # validate exports such a set itself, here with batch 2 baked in, and compares batch 2
    assert main(["validate", *model, "--formats", "onnx", "--fixed-batch", "2",
                 "--onnx-target", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "inputs image[2, 3, 224, 224]" in out and "| onnxruntime onnx (opt full) | 2 |" in out
    assert "validation PASSED" in out


def test_validate_cli_refuses_the_old_batch_size_without_a_fixed_batch(capsys):
    assert main(["validate", "--model", "od_tinynet", "--batch-size", "2"]) == 3
    err = capsys.readouterr().err
    assert "--batch-size is deprecated" in err and "use --fixed-batch 2" in err


def test_old_spelling_batches_still_works_and_names_the_new_one(tmp_path, capsys):
    args = ["validate", "--model", "od_tinynet", "--kernel-num", "1", "--formats", "onnx"]
    assert main(args + ["--batches", "2"]) == 0
    captured = capsys.readouterr()
    assert "--batches is deprecated" in captured.err and "use --batch" in captured.err
    assert "| onnxruntime onnx (opt full) | 2 |" in captured.out
    assert main(args + ["--batch", "2"]) == 0
    assert "deprecated" not in capsys.readouterr().err


def test_validate_without_out_leaves_no_log_when_it_passes_and_names_it_when_it_fails(
        tmp_path, monkeypatch, capsys):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = ["validate", "--model", "od_tinynet", "--formats", "onnx", "--no-routing"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "validation PASSED"
    assert not list(tmp_path.glob("odconv-deploy-*.log"))
    # a checkpoint that does not load: an error after the log was opened keeps and names it
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["validate", "--model", "od_tinynet", "--checkpoint", str(bad),
                 "--formats", "onnx"]) == 3
    logs = list(tmp_path.glob("odconv-deploy-*.log"))
    assert len(logs) == 1 and f"third-party output of this run: {logs[0]}" in \
        capsys.readouterr().err


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_full_disk_is_a_user_error_that_keeps_nothing_partial(tmp_path, monkeypatch, capsys,
                                                               wrapped):
    import errno

    import odconv_deploy.conversions as conversions

    def save_until_full(obj, path):  # writes part of the file, then the disk is full
        Path(path).write_bytes(b"partial")
        full = OSError(errno.ENOSPC, "No space left on device", str(path))
        if wrapped:  # as a library re-raises it (torch.save: RuntimeError ... write failed)
            raise RuntimeError("file write failed") from full
        raise full

    monkeypatch.setattr(conversions.torch, "save", save_until_full)
    out = tmp_path / "ckpt" / "deploy.pt"
    assert main(["convert", "--model", "od_tinynet", "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "the disk is full (No space left on device writing " in err and "Traceback" not in err
    assert [p.name for p in out.parent.iterdir()] == ["odconv-deploy.log"]  # no partial file
