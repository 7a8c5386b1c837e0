"""Every runner honours one contract: activate / infer / deactivate, metadata, timing."""

import numpy as np
import pytest
import torch

from export import export_executorch, export_onnx, export_ort, simplify_onnx
from odconv_deploy import InputShapeError, create_model
from odconv_deploy.runners import (
    BackendUnavailableError,
    CoreMLRunner,
    ExecuTorchRunner,
    OnnxRuntimeRunner,
    RunnerError,
    TorchRunner,
    coreml_predict_available,
)
from odconv_deploy.synthetic import synthesize_weights
from odconv_deploy.validation.inputs import seeded_feed


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("runners")
    model = synthesize_weights(create_model("od_tinynet", kernel_num=2))
    onnx = export_onnx(model, out / "t.onnx")
    return {"model": model, "onnx": onnx, "ort": export_ort(simplify_onnx(onnx)),
            "pte": export_executorch(model, out / "t.pte")}


RUNNERS = {
    "torch": lambda a: TorchRunner(a["model"]),
    "ort-off": lambda a: OnnxRuntimeRunner(a["onnx"].path, optimization="off"),
    "ort-full-1thread": lambda a: OnnxRuntimeRunner(a["onnx"].path, threads=1),
    "ort-2threads-no-spin": lambda a: OnnxRuntimeRunner(a["onnx"].path, threads=2, spin=False),
    "ort-format": lambda a: OnnxRuntimeRunner(a["ort"].path),
    "executorch": lambda a: ExecuTorchRunner.from_export(a["pte"], threads=1),
}


@pytest.mark.parametrize("kind", list(RUNNERS))
def test_runner_contract(artifacts, kind):
    runner = RUNNERS[kind](artifacts)
    with pytest.raises(RunnerError, match="activate"):
        runner.infer({"image": np.zeros((1, 3, 32, 32), np.float32)})
    with runner:
        assert runner.is_active
        (meta,) = runner.input_metadata()
        assert meta.name == "image" and meta.shape[1:] == (3, 32, 32) and meta.flexible_batch
        x = seeded_feed(artifacts["model"].io_spec, 3)["image"]
        out = runner.infer({"image": x})
        assert runner.last_inference_time is not None and runner.last_inference_time > 0
        with torch.no_grad():
            ref = artifacts["model"](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out["logits"], ref, rtol=1e-4, atol=1e-4)
        with pytest.raises(InputShapeError, match="received inputs"):
            runner.infer({"wrong": x})
        with pytest.raises(InputShapeError, match=r"received shape \(3, 3, 31, 32\)"):
            runner.infer({"image": x[:, :, :31]})
    assert not runner.is_active


def test_fixed_batch_artifact_metadata(tmp_path):
    model = synthesize_weights(create_model("od_tinynet"))
    onnx = export_onnx(model, tmp_path / "s.onnx", dynamic_batch=False)
    with OnnxRuntimeRunner(onnx.path) as runner:
        assert runner.accepts_batch(1) and not runner.accepts_batch(3)


def test_unloadable_artifact_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(RunnerError, match="cannot load"):
        OnnxRuntimeRunner(bad).activate()
    with pytest.raises(RunnerError, match="Unknown optimization level"):
        OnnxRuntimeRunner(bad, optimization="max")


@pytest.mark.skipif(coreml_predict_available()[0], reason="on macOS CoreML predict is available")
def test_coreml_predict_unavailable_off_macos_says_why(tmp_path):
    with pytest.raises(BackendUnavailableError, match="needs macOS"):
        CoreMLRunner(tmp_path / "m.mlpackage").activate()


@pytest.mark.parametrize("threads,spin", [(1, "1"), (2, "0")])
def test_bench_ort_pools_spin_only_single_threaded(artifacts, threads, spin):
    from runtime_bench.bench_formats import BENCH_FORMATS

    runner = BENCH_FORMATS["onnx-sim"].make(None, None, artifacts["onnx"], threads)
    with runner:
        options = runner.session.get_session_options()
        try:
            entry = options.get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # unset: ONNX Runtime's default, spinning
            entry = "1"
        assert entry == spin
