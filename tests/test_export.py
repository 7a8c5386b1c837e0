"""Export: every format produced, loaded and run where this machine can run it."""

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from export import (
    ExportError,
    ExportFormat,
    export_coreml,
    export_executorch,
    export_formats,
    export_onnx,
    export_ort,
    parse_formats,
    simplify_onnx,
)
from odconv_deploy import create_model
from odconv_deploy._atomic import OutputPathError
from odconv_deploy.synthetic import synthesize_weights
from tests.helpers import randomize_odconv
from tests.reference_layer import PastedODConv2d

ort = pytest.importorskip("onnxruntime")


def _tiny(k=4, seed=0):
    return synthesize_weights(create_model("od_tinynet", kernel_num=k), seed=seed)


class UserNet(nn.Module):
    """A user network with pasted reference ODConv layers and no io_spec."""

    def __init__(self):
        super().__init__()
        self.od1 = PastedODConv2d(3, 8, 3, 2, 1, kernel_num=4)
        self.bn1 = nn.BatchNorm2d(8)
        self.od2 = PastedODConv2d(8, 8, 5, 1, 2, groups=8, kernel_num=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.od2(torch.relu(self.bn1(self.od1(x)))))


def _run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _assert_matches(got, ref, rtol=1e-4):
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= rtol * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name,k", [("od_resnet18", 4), ("od_mobilenetv2_050", 1)])
def test_onnx_dynamic_batch_matches_pytorch(tmp_path, name, k):
    model = synthesize_weights(create_model(name, kernel_num=k))
    result = export_onnx(model, tmp_path / "m.onnx")
    assert result.dynamic_batch and result.input_shapes["image"] == ["batch", 3, 224, 224]
    meta = {p.key: p.value for p in __import__("onnx").load(str(result.path)).metadata_props}
    assert meta["model"] == name and meta["strategy"] == "im2col" and "version.torch" in meta
    for batch in (1, 3, 8):
        (x,) = model.io_spec.sample_inputs(batch, seed=batch)
        with torch.no_grad():
            _assert_matches(_run_onnx(result.path, x), model(x))


def test_onnx_user_network_and_spatial_dynamic(tmp_path):
    model = randomize_odconv(UserNet()).eval()
    result = export_onnx(model, tmp_path / "u.onnx", input_shape=(1, 3, 40, 36),
                         dynamic_spatial=True)
    assert result.input_shapes["input"] == ["batch", 3, "height", "width"]
    for shape in ((1, 3, 40, 36), (2, 3, 29, 51)):
        x = torch.randn(*shape)
        with torch.no_grad():
            _assert_matches(_run_onnx(result.path, x), model(x))


def test_simplify_and_ort_format(tmp_path):
    model = _tiny()
    raw = export_onnx(model, tmp_path / "t.onnx")
    sim = simplify_onnx(raw)
    assert sim.ok, sim.error
    assert sim.path == tmp_path / "t.sim.onnx"
    assert sim.details["nodes_after"] < sim.details["nodes_before"]
    orted = export_ort(sim)
    assert orted.path.suffix == ".ort"
    config = orted.path.with_suffix(".required_operators_and_types.config")
    assert config.is_file() and "ai.onnx" in config.read_text()
    assert "ai.onnx:MatMul" in orted.details["required_operators"]
    for batch in (1, 3):
        (x,) = model.io_spec.sample_inputs(batch, seed=batch)
        with torch.no_grad():
            _assert_matches(_run_onnx(orted.path, x), model(x))


def test_simplify_failure_is_reported_not_swallowed(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ExportError, match="is not a readable ONNX model"):
        simplify_onnx(bad)
    model = _tiny()
    raw = export_onnx(model, tmp_path / "t.onnx")
    with pytest.raises(ExportError, match="simplified outputs differ"):  # impossible tolerance
        simplify_onnx(raw, rtol=-1.0)
    assert not (tmp_path / "t.sim.onnx").exists()


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_coreml_converts_saves_loads_with_no_rank_over_5(tmp_path, precision):
    ct = pytest.importorskip("coremltools")
    model = _tiny()
    result = export_coreml(model, tmp_path / "t.mlpackage", precision=precision,
                           minimum_deployment_target="iOS16")
    assert result.details["max_rank"] <= 5
    assert result.input_shapes["image"][0] == "batch"
    spec = ct.models.MLModel(str(result.path), skip_model_load=True).get_spec()
    assert spec.description.metadata.userDefined["strategy"] == "im2col"
    dims = spec.description.input[0].type.multiArrayType.shapeRange.sizeRanges
    assert (dims[0].lowerBound, dims[0].upperBound) == (1, 64)


@pytest.mark.skipif(sys.platform != "darwin",
                    reason="CoreML predict needs macOS (coremltools' Linux wheels cannot run "
                           "models); the MIL reference executor checks the numbers here")
def test_coreml_predict_matches_pytorch_on_macos(tmp_path):
    ct = pytest.importorskip("coremltools")
    model = _tiny()
    result = export_coreml(model, tmp_path / "t.mlpackage", precision="fp32")
    mlmodel = ct.models.MLModel(str(result.path), compute_units=ct.ComputeUnit.CPU_ONLY)
    for batch in (1, 3):
        (x,) = model.io_spec.sample_inputs(batch, seed=batch)
        with torch.no_grad():
            _assert_matches(mlmodel.predict({"image": x.numpy()})["logits"], model(x), 1e-3)


def test_coreml_zoo_model_has_no_batch_dependent_group(tmp_path):
    pytest.importorskip("coremltools")
    model = synthesize_weights(create_model("od_mobilenetv2_050", kernel_num=4))
    result = export_coreml(model, tmp_path / "m.mlpackage")
    assert result.details["max_rank"] <= 4
    assert result.details["convs"] >= 1


def test_executorch_pte_runs_and_reports_delegation(tmp_path):
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime

    model = _tiny()
    result = export_executorch(model, tmp_path / "t.pte")
    details = result.details
    assert details["delegated_nodes"] > 0 and details["conv_matmul_macs"] > 0
    assert 0.0 <= details["conv_matmul_macs_delegated_share"] <= 1.0
    assert details["max_batch_planned"] == 64
    assert json.dumps(result.to_dict())  # JSON-ready
    method = Runtime.get().load_program(str(result.path)).load_method("forward")
    for batch in (1, 3, 16, 64):  # 16+: beyond the bound lowering used to impose
        (x,) = model.io_spec.sample_inputs(batch, seed=batch)
        with torch.no_grad():
            _assert_matches(method.execute([x])[0], model(x))


def test_export_formats_writes_everything_and_records_failures(tmp_path):
    model = _tiny()
    results = export_formats(model, tmp_path, parse_formats("onnx,onnx-sim,ort"), stem="tiny")
    assert [r.format for r in results] == [ExportFormat.ONNX, ExportFormat.ONNX_SIMPLIFIED,
                                           ExportFormat.ORT]
    assert all(r.ok for r in results)
    again = export_formats(model, tmp_path, [ExportFormat.ONNX], stem="tiny")
    assert not again[0].ok and "already exists" in again[0].error


def test_bad_inputs_are_clear_and_leave_no_partial_file(tmp_path):
    with pytest.raises(ExportError, match="Unknown export format 'tflite'.*onnx, onnx-sim"):
        parse_formats("onnx,tflite")
    model = _tiny()
    with pytest.raises(ExportError, match="opset=3"):
        export_onnx(model, tmp_path / "o.onnx", opset=3)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "exists.onnx").write_text("keep me")
    with pytest.raises(OutputPathError, match="already exists"):
        export_onnx(model, tmp_path / "exists.onnx")
    assert (tmp_path / "exists.onnx").read_text() == "keep me"
    with pytest.raises(ExportError, match="bakes the batch"):
        export_onnx(model, tmp_path / "d.onnx", strategy="dynamic_weight")
    fixed = export_onnx(model, tmp_path / "d.onnx", strategy="dynamic_weight",
                        dynamic_batch=False)
    assert fixed.input_shapes["image"] == [1, 3, 32, 32]

    class Broken(nn.Module):
        io_spec = model.io_spec

        def forward(self, x):
            return x.view(7, -1, 5)

    with pytest.raises(ExportError, match=r"fails to run on the input image\[1, 3, 32, 32\]"):
        export_onnx(Broken(), tmp_path / "b.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "exists.onnx"]


def test_unwritable_output_location(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(OutputPathError, match="Cannot create the folder"):
        export_onnx(_tiny(), blocker / "sub" / "x.onnx")
    assert blocker.read_text().startswith("a file")
