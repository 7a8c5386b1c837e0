"""strategy="auto": per-layer choice from the export target, exact, recorded in the artifacts."""

import itertools

import onnx
import onnxruntime as ort
import pytest
import torch

from export import ExportError, export_executorch, export_formats, export_onnx
from odconv_deploy import (
    AutoStrategy,
    ODConv2d,
    UnsupportedLayerError,
    convert_model,
    inspect_odconv,
)
from odconv_deploy.cli import main
from odconv_deploy.io_spec import IOSpec, TensorSpec
from odconv_deploy.layers.ort_nchwc import ort_nchwc_block
from tests.helpers import randomize_odconv
from tests.test_export import UserNet, _assert_matches, _run_onnx

SHAPE = (1, 3, 32, 32)


def _inputs(batch: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The project's seeded input for UserNet (no io_spec of its own)."""
    (x,) = IOSpec((TensorSpec("input", SHAPE, dtype),), ()).sample_inputs(batch, seed=batch)
    return x


@pytest.fixture(scope="module")
def user_net():
    """Pasted reference layers: od1 dense 3x3 (after it a BatchNorm), od2 depthwise 5x5."""
    torch.manual_seed(0)
    return randomize_odconv(UserNet(), seed=3).eval()


def test_rules(user_net):
    dense, depthwise = inspect_odconv(user_net.od1, "od1"), inspect_odconv(user_net.od2, "od2")
    # Batch baked in: every layer one computed-weight conv; for ORT on this machine, on the
    # NCHWc kernels where the layer fits the CPU's block (od1 has 3 input channels: never).
    fixed = AutoStrategy("onnx", dynamic_batch=False)
    assert fixed.choose(depthwise) == fixed.choose(dense) == "dynamic_weight"
    fixed = AutoStrategy("onnxruntime", dynamic_batch=False)
    block = ort_nchwc_block()
    fits = block is not None and depthwise.in_channels % block == 0
    assert fixed.choose(depthwise) == ("ort_nchwc" if fits else "dynamic_weight")
    assert fixed.choose(dense) == "dynamic_weight"
    strided = inspect_odconv(ODConv2d(8, 8, 3, stride=2, padding=1, groups=8), "strided")
    for target in ("onnx", "onnxruntime"):  # any batch: never batch-baked
        assert AutoStrategy(target, dynamic_batch=True).choose(depthwise) == "depthwise_taps"
        assert AutoStrategy(target, dynamic_batch=True).choose(strided) == "im2col"
        assert AutoStrategy(target, dynamic_batch=True).choose(dense) == "im2col"
    for target, batch_axis in itertools.product(("coreml", "torch"), (True, False)):
        assert AutoStrategy(target, dynamic_batch=batch_axis).choose(depthwise) == "im2col"
    for batch_axis in (True, False):  # XNNPACK: never a computed conv weight
        executorch = AutoStrategy("executorch", dynamic_batch=batch_axis)
        assert executorch.choose(depthwise) == "depthwise_taps"
        assert executorch.choose(strided) == "depthwise_taps"
        assert executorch.choose(dense) == "im2col"


def test_unknown_target_and_strategy_are_refused(user_net):
    with pytest.raises(UnsupportedLayerError,
                       match="target 'tflite'.*onnx, onnxruntime, coreml, executorch, torch"):
        convert_model(user_net, strategy="auto", target="tflite")
    with pytest.raises(UnsupportedLayerError, match="Unknown deploy strategy 'fast'.*'auto'"):
        convert_model(user_net, strategy="fast")


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_auto_mix_is_exact_in_float64(user_net, batch):
    model = user_net.double()
    try:
        result = convert_model(model, strategy="auto", target="onnxruntime")
        assert result.strategy == "auto"
        assert {c.name: c.form for c in result.layers} == {"od1": "im2col",
                                                              "od2": "depthwise_taps"}
        assert result.layer_forms == {"im2col": 1, "depthwise_taps": 1}
        assert all(c.max_abs_error <= 1e-9 * max(1.0, c.reference_scale) for c in result.layers)
        x = _inputs(batch, torch.float64)
        with torch.no_grad():
            ref, got = model(x), result.model(x)
        assert (got - ref).abs().max().item() <= 1e-10 * max(1.0, ref.abs().max().item())
    finally:
        user_net.float()


def test_fixed_batch_onnx_records_the_mix_and_matches(user_net, tmp_path):
    result = export_onnx(user_net, tmp_path / "auto.onnx", strategy="auto", dynamic_batch=False,
                         input_shape=SHAPE)
    assert result.options["strategy"] == "auto"
    assert result.options["layer_forms"] == {"dynamic_weight": 2}
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert meta["strategy"] == "auto"
    assert meta["layer_strategies"] == "dynamic_weight:2"
    x = _inputs(1)
    with torch.no_grad():
        _assert_matches(_run_onnx(result.path, x), user_net(x))


def test_fixed_batch_size_other_than_one_is_baked_in_and_matches(user_net, tmp_path):
    result = export_onnx(user_net, tmp_path / "b4.onnx", strategy="auto", dynamic_batch=False,
                         batch_size=4, input_shape=SHAPE)
    assert result.options["batch_size"] == 4
    assert result.input_shapes[result.input_names[0]][0] == 4
    x = _inputs(4)
    with torch.no_grad():
        _assert_matches(_run_onnx(result.path, x), user_net(x))
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # the batch really is fixed
        session.run(None, {result.input_names[0]: torch.randn(1, 3, 32, 32).numpy()})


def test_bad_batch_size_is_refused_before_writing(user_net, tmp_path):
    with pytest.raises(ExportError, match="positive int, got 0"):
        export_onnx(user_net, tmp_path / "x.onnx", dynamic_batch=False, batch_size=0,
                    input_shape=SHAPE)
    with pytest.raises(ExportError, match="batch_size=8 fixes the batch.*dynamic_batch=False"):
        export_onnx(user_net, tmp_path / "x.onnx", batch_size=8, input_shape=SHAPE)
    assert not (tmp_path / "x.onnx").exists()


def test_export_formats_fixed_batch_is_onnx_and_ort_only(user_net, tmp_path):
    results = {r.format.value: r for r in export_formats(
        user_net, tmp_path, ["ort", "pte"], strategy="auto", dynamic_batch=False, batch_size=2,
        input_shape=SHAPE)}
    assert results["onnx"].ok and results["ort"].ok
    assert results["ort"].input_shapes[results["ort"].input_names[0]][0] == 2
    assert not results["pte"].ok and "ONNX and ORT only" in results["pte"].error
    assert not list(tmp_path.glob("*.pte"))  # nothing half-written


def test_dynamic_batch_auto_keeps_every_layer_batch_agnostic(user_net, tmp_path):
    result = export_onnx(user_net, tmp_path / "auto_dyn.onnx", strategy="auto",
                         input_shape=SHAPE)
    assert result.options["layer_forms"] == {"im2col": 1, "depthwise_taps": 1}
    x = _inputs(3)
    with torch.no_grad():
        _assert_matches(_run_onnx(result.path, x), user_net(x))


def test_pte_auto_delegates_everything_and_matches(user_net, tmp_path):
    pytest.importorskip("executorch")
    from odconv_deploy.runners.executorch_runner import ExecuTorchRunner

    result = export_executorch(user_net, tmp_path / "auto.pte", strategy="auto",
                               input_shape=SHAPE)
    assert result.options["layer_forms"] == {"im2col": 1, "depthwise_taps": 1}
    assert result.details["conv_matmul_macs_delegated_share"] == pytest.approx(1.0)
    runner = ExecuTorchRunner(result.path, input_names=result.input_names,
                              input_shapes=result.input_shapes, output_names=result.output_names)
    x = _inputs(3)
    with runner, torch.no_grad():
        (got,) = runner.infer({result.input_names[0]: x.numpy()}).values()
        _assert_matches(got, user_net(x))


def test_export_formats_converts_per_target(user_net, tmp_path):
    results = {r.format.value: r for r in export_formats(
        user_net, tmp_path, ["onnx", "pte"], strategy="auto", dynamic_batch=False,
        input_shape=SHAPE)}
    assert all(r.ok for r in results.values()), {k: r.error for k, r in results.items()}
    assert results["onnx"].options["layer_forms"] == {"dynamic_weight": 2}
    assert results["pte"].options["layer_forms"] == {"im2col": 1, "depthwise_taps": 1}


def test_a_forced_dynamic_batch_with_batch_baked_layers_is_refused(user_net, tmp_path):
    mixed = convert_model(user_net, strategy="auto", target="onnxruntime",
                          dynamic_batch=False).model
    with pytest.raises(ExportError, match="'dynamic_weight' form bakes the batch"):
        export_onnx(mixed, tmp_path / "x.onnx", input_shape=SHAPE)
    assert not (tmp_path / "x.onnx").exists()


def test_cli_convert_auto(tmp_path, capsys):
    out = tmp_path / "auto.pt"
    assert main(["convert", "--model", "od_mobilenetv2_050", "--kernel-num", "2", "--strategy",
                 "auto", "--target", "onnx", "--fixed-batch", "1", "--out", str(out)]) == 0
    saved = torch.load(out, weights_only=False)
    assert saved["strategy"] == "auto"
    assert saved["layer_strategies"] == {"dynamic_weight": 51}
    assert saved["layer_forms"]["features.1.conv.0.0"] == "dynamic_weight"  # the first depthwise
    assert saved["nchwc_block"] is None
    assert "'dynamic_weight': 51" in capsys.readouterr().out


def test_cli_convert_auto_for_ort_records_the_nchwc_block(tmp_path):
    block = ort_nchwc_block()
    if block is None:
        pytest.skip("this onnxruntime has no NCHWc kernels")
    out = tmp_path / "auto.pt"
    assert main(["convert", "--model", "od_mobilenetv2_050", "--kernel-num", "2", "--strategy",
                 "auto", "--target", "onnxruntime", "--fixed-batch", "1", "--out", str(out)]) == 0
    saved = torch.load(out, weights_only=False)
    assert saved["layer_forms"]["features.1.conv.0.0"] == "ort_nchwc"  # 16 channels: fits
    # The 1x1 projection to 8 channels too: its blocked maps are padded to one block.
    assert saved["layer_forms"]["features.1.conv.1"] == "ort_nchwc"
    assert saved["nchwc_block"] == block  # the blocked weights' layout
