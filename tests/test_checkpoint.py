"""Checkpoint loading: wrapped dicts, DataParallel prefixes, readable mismatch errors."""

import pytest
import torch
from torch import nn

from odconv_deploy import CheckpointError, create_model, load_checkpoint
from tests.reference_layer import PastedODConv2d


def _model(k=4):
    return create_model("od_mobilenetv2_050", kernel_num=k, num_classes=10)


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "module_prefix", "nested_and_prefixed"])
def test_loads_wrapped_checkpoints(tmp_path, wrap):
    source = _model()
    sd = source.state_dict()
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    payload = {"raw": sd, "state_dict": {"state_dict": sd, "epoch": 90, "best_acc1": 0.7},
               "module_prefix": prefixed,
               "nested_and_prefixed": {"state_dict": prefixed, "optimizer": {}}}[wrap]
    path = tmp_path / "ckpt.pth.tar"
    torch.save(payload, path)
    for src in (path, payload):
        target = load_checkpoint(_model(), src)
        for k, v in sd.items():
            assert torch.equal(target.state_dict()[k], v), k


def test_reference_checkpoint_loads_into_zoo_layer():
    ref = PastedODConv2d(16, 32, 3, 1, 1, kernel_num=4)
    target = nn.Sequential(create_model("od_resnet18", kernel_num=4).layer1[0].conv1)
    target[0] = type(target[0])(16, 32, 3, 1, 1, kernel_num=4)
    load_checkpoint(target[0], ref.state_dict())


def test_kernel_num_mismatch_lists_shapes():
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_model(k=1), _model(k=4).state_dict())
    msg = str(info.value)
    assert "shape mismatches" in msg and "[4, " in msg and "kernel_num" in msg
    assert "missing from the checkpoint" not in msg or "kernel_fc" in msg


def test_other_architecture_lists_missing_and_unexpected():
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_model(), create_model("od_resnet18", kernel_num=4).state_dict())
    msg = str(info.value)
    assert "missing from the checkpoint" in msg and "unexpected in the checkpoint" in msg
    assert "features.0.0.weight" in msg or "features." in msg


def test_corrupt_and_truncated_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(_model().state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match="cannot be read"):
            load_checkpoint(_model(), bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(_model(), tmp_path / "missing.pt")


def test_non_tensor_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no tensors"):
        load_checkpoint(_model(), {"epoch": 3})
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(_model(), [1, 2])
