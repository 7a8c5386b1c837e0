"""int8w: the kernel bank stored int8 per output channel, in PyTorch and in every artifact."""

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from export.formats import check_precision
from export.result import ExportError, ExportFormat
from export.run import export_formats
from export.to_coreml import export_coreml
from export.validation import validate_artifacts
from odconv_deploy import LAYER_FORMS, ODConv2d, convert_model, create_model, inspect_odconv
from odconv_deploy.conversions import Conversions
from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.layers.deploy import ODConv2dDeploy
from odconv_deploy.quantize import (
    INT8_LIMIT,
    Int8Weight,
    channel_scales,
    has_int8_banks,
    quantize_kernel_banks,
)
from odconv_deploy.synthetic import synthesize_weights
from odconv_deploy.validation.drift import quantization_drift
from tests.helpers import randomize_odconv

# cin, cout, k, stride, pad, dil, groups, K (ort_nchwc: channels in blocks of 4)
GEOMETRIES = [(8, 12, 3, 1, 1, 1, 1, 4), (8, 8, 3, 2, 1, 1, 8, 4), (8, 16, 1, 1, 0, 1, 1, 2),
              (8, 8, 5, 1, 2, 1, 2, 4)]


def takes(form: str, cfg: tuple[int, ...]) -> bool:
    """Whether deploy form ``form`` is made for geometry ``cfg``."""
    cin, cout, k, stride, _, _, g, _ = cfg
    if form == "depthwise_taps":
        return cin == cout == g
    if form == "dynamic_linear":
        return g == 1 and stride == 1
    return form != "ort_nchwc" or (k > 1 and g in (1, cin))


def deploy_layer(form: str, cfg: tuple[int, ...], seed: int = 0) -> ODConv2dDeploy:
    """A float64 deploy layer of ``form`` with a folded BatchNorm."""
    cin, cout, k, s, p, d, g, kn = cfg
    layer = ODConv2d(cin, cout, k, s, p, d, g, kernel_num=kn).double()
    block = randomize_odconv(nn.Sequential(layer, nn.BatchNorm2d(cout).double()), seed=seed)
    block.eval()
    options = {"block": 4} if form == "ort_nchwc" else {}
    return LAYER_FORMS[form].from_spec(inspect_odconv(layer), block[1], **options).eval()


CASES = [(form, cfg) for form in sorted(LAYER_FORMS) for cfg in GEOMETRIES if takes(form, cfg)]


@pytest.mark.parametrize(("form", "cfg"), CASES, ids=lambda v: str(v))
def test_canonical_weight_inverts_the_layout(form, cfg):
    layer = deploy_layer(form, cfg)
    canonical = layer.canonical_weight()
    assert canonical.shape == (cfg[7], cfg[1], cfg[0] // cfg[6], cfg[2], cfg[2])
    assert torch.equal(layer.layout_weight(canonical), layer.weight)


@pytest.mark.parametrize(("form", "cfg"), CASES, ids=lambda v: str(v))
def test_an_int8_bank_layer_computes_its_dequantized_bank_float64(form, cfg):
    """The quantized layer is exactly the float layer holding q * s (any form, any batch)."""
    layer = deploy_layer(form, cfg, seed=3)
    quantized = copy.deepcopy(layer)
    quantized.store_bank_int8()
    assert quantized.weight is None and isinstance(quantized.weight_int8, Int8Weight)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.copy_(layer.layout_weight(quantized.weight_int8()))
    assert not torch.equal(twin.weight, layer.weight), "quantization must change the bank"
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 2, 5):
        x = torch.randn(batch, cfg[0], 11, 13, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            expected, actual = twin(x), quantized(x)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12 * expected.abs().max())


def test_every_form_is_covered():
    assert {form for form, _ in CASES} == set(LAYER_FORMS)


def test_the_scheme_per_output_channel():
    bank = torch.randn(4, 6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    bank[:, 2] = 0.0  # an all-zero channel
    bank[:, 4] *= 1e-3  # a small one keeps its own resolution
    q = Int8Weight(bank, 1)
    assert q.q.dtype == torch.int8 and q.q.shape == bank.shape
    assert int(q.q.abs().max()) <= INT8_LIMIT
    peaks = q.q.abs().amax(dim=(0, 2, 3, 4))
    assert peaks[2] == 0 and q.scale[2] == 1.0
    assert all(int(peaks[o]) == INT8_LIMIT for o in (0, 1, 3, 4, 5))
    error = (q() - bank).abs()
    assert torch.all(error <= q.scale.reshape(1, -1, 1, 1, 1) / 2 * (1 + 1e-6))
    assert error[:, 4].max() < 1e-3 * error[:, 0].max() * 2


def test_the_bank_scale_bounds_every_aggregated_weight():
    """|W(x)| <= max_i |W_i|: the stored bank's scale never clips a computed weight."""
    layer = deploy_layer("im2col", (8, 12, 3, 1, 1, 1, 1, 4), seed=5)
    bank = layer.canonical_weight()
    scale = channel_scales(bank).reshape(1, -1, 1, 1, 1)
    x = torch.randn(64, 8, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        att = layer.attentions(x)
        weight = torch.einsum("bk,koihw->boihw", att.kernel, bank)
        weight = weight * att.spatial.reshape(-1, 1, 1, 3, 3)
    assert torch.all(weight.abs() <= INT8_LIMIT * scale * (1 + 1e-12))
    # The check can fail: a scale from one kernel alone clips some computed weight.
    one_kernel = bank[:1].abs().amax(dim=(0, 2, 3, 4)).reshape(1, -1, 1, 1, 1) / INT8_LIMIT
    assert torch.any(weight.abs() > INT8_LIMIT * one_kernel)


def test_quantize_kernel_banks_copies_and_refuses_what_it_cannot_take():
    model = synthesize_weights(create_model("od_tinynet", kernel_num=4)).eval()
    deploy = convert_model(model, strategy="im2col").model
    quantized = quantize_kernel_banks(deploy)
    assert has_int8_banks(quantized) and not has_int8_banks(deploy)
    layers = [m for m in deploy.modules() if isinstance(m, ODConv2dDeploy)]
    assert all(isinstance(m.weight, nn.Parameter) for m in layers), "the input is left alone"
    int8 = [k for k, v in quantized.state_dict().items() if v.dtype == torch.int8]
    assert len(int8) == len(layers)
    with pytest.raises(ODConvDeployError, match="no ODConv deploy layer"):
        quantize_kernel_banks(nn.Sequential(nn.Conv2d(3, 4, 3)))
    nchwc = nn.Sequential(deploy_layer("ort_nchwc", GEOMETRIES[0]))
    with pytest.raises(ODConvDeployError, match="ort_nchwc.*--onnx-target onnx"):
        quantize_kernel_banks(nchwc)
    with pytest.raises(ODConvDeployError, match="has no ODConv layer.*--precision fp32"):
        Conversions(nn.Sequential(nn.Conv2d(3, 4, 3)), precision="int8w")
    with pytest.raises(ODConvDeployError, match="Unknown precision 'int4'.*int8w"):
        Conversions(model, precision="int4")


def test_a_precision_a_format_cannot_take_is_refused_with_the_formats_that_can():
    check_precision("int8w", [ExportFormat.ONNX, ExportFormat.COREML, ExportFormat.EXECUTORCH])
    with pytest.raises(ExportError, match="fp16 is not made for onnx, pte.*take it are coreml"):
        check_precision("fp16", [ExportFormat.ONNX, ExportFormat.EXECUTORCH, ExportFormat.COREML])


def test_drift_is_measured_and_zero_for_the_float_model_itself():
    model = synthesize_weights(create_model("od_tinynet", kernel_num=4)).eval()
    deploy = convert_model(model, strategy="im2col").model
    spec = model.io_spec
    feeds = [{spec.input_names[0]: np.asarray(spec.sample_inputs(8, seed=s)[0])}
             for s in range(3)]
    same = quantization_drift(deploy, deploy, feeds, spec.output_names, precision="fp32",
                              inputs="seeded", classifier=True)
    assert same.outputs[0].sqnr_db == float("inf") and same.worst_kernel_agreement == 1.0
    drift = quantization_drift(deploy, quantize_kernel_banks(deploy), feeds, spec.output_names,
                               precision="int8w", inputs="seeded", classifier=True)
    out = drift.outputs[0]
    assert out.samples == 24 and 20 < out.sqnr_db < 120 and out.max_rel > 0
    assert len(drift.kernel_choices) == 4
    assert "int8w against float32 PyTorch on seeded" in drift.to_markdown()


@pytest.fixture(scope="module")
def int8w_artifacts(tmp_path_factory):
    model = synthesize_weights(create_model("od_tinynet", kernel_num=4)).eval()
    conversions = Conversions(model, "im2col", precision="int8w")
    results = export_formats(model, tmp_path_factory.mktemp("int8w"),
                             [ExportFormat.ONNX, ExportFormat.ONNX_SIMPLIFIED, ExportFormat.ORT,
                              ExportFormat.EXECUTORCH, ExportFormat.COREML],
                             conversions=conversions)
    return model, conversions, {r.format: r for r in results}


def test_int8w_artifacts_store_the_banks_int8(int8w_artifacts):
    model, conversions, results = int8w_artifacts
    assert all(r.ok for r in results.values()), [r.error for r in results.values()]
    banks = [m.weight_int8.q.numpy() for m in conversions.get("onnx").model.modules()
             if isinstance(m, ODConv2dDeploy)]
    for fmt in (ExportFormat.ONNX, ExportFormat.ONNX_SIMPLIFIED):
        proto = onnx.load(str(results[fmt].path))
        graph = proto.graph
        assert {p.key: p.value for p in proto.metadata_props}["weights"] == "int8w"
        stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        dequantized = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"]
        assert len(dequantized) == len(banks)
        for name, bank in zip(dequantized, banks, strict=True):
            assert np.array_equal(stored[name], bank)
        split = results[fmt].details["size_split"]
        assert split["banks_found"] == len(banks)
        assert split["kernel_bank_bytes"] == sum(b.nbytes for b in banks)
    assert results[ExportFormat.ONNX].options["weights"] == "int8w"
    assert results[ExportFormat.EXECUTORCH].options["weights"] == "int8w"
    ops = results[ExportFormat.COREML].op_counts
    assert ops.get("constexpr_affine_dequantize") == len(banks)
    assert results[ExportFormat.COREML].options["minimum_deployment_target"] == "iOS17"
    assert results[ExportFormat.COREML].details["size_split"]["banks_found"] == len(banks)
    # .ort keeps the int8 banks (ONNX Runtime does not fold DequantizeLinear of a constant);
    # .pte keeps them as int8 constants.
    config = results[ExportFormat.ORT].details["required_operators"]
    assert any("DequantizeLinear" in op for op in config)
    fp32 = export_formats(model, results[ExportFormat.ONNX].path.parent / "fp32",
                          [ExportFormat.ORT, ExportFormat.EXECUTORCH],
                          conversions=Conversions(model, "im2col"), measure_sizes=False)
    bank_bytes = sum(b.nbytes for b in banks)
    for r in fp32:
        if r.format in (ExportFormat.ORT, ExportFormat.EXECUTORCH):
            saved = r.file_size_bytes - results[r.format].file_size_bytes
            assert saved > 2.5 * bank_bytes, (r.format, saved, bank_bytes)  # 3 of 4 bytes


def test_int8w_artifacts_match_the_quantized_model_not_the_float_one(int8w_artifacts):
    model, conversions, results = int8w_artifacts
    quantized = conversions.get("torch").model
    artifacts = list(results.values())
    report = validate_artifacts(model, artifacts, deploy_model=quantized, quantized=True,
                                batches=(1, 3))
    assert report.passed, report.to_markdown()
    assert report.reference == "torch int8w (kernel banks int8)"
    assert len(report.comparisons) >= 14
    # The same artifacts against the float32 model at its rules: the check can fail.
    against_float = validate_artifacts(model, artifacts, batches=(3,))
    assert not against_float.passed


def test_coreml_refuses_an_int8_bank_below_ios17(tmp_path):
    model = synthesize_weights(create_model("od_tinynet", kernel_num=4)).eval()
    quantized = quantize_kernel_banks(convert_model(model, strategy="im2col").model)
    with pytest.raises(ExportError, match="iOS17 or later.*got iOS16"):
        export_coreml(quantized, tmp_path / "m.mlpackage", minimum_deployment_target="iOS16",
                      io_spec=model.io_spec)
    assert not (tmp_path / "m.mlpackage").exists()


def test_a_twin_stores_its_stand_in_convs_int8_and_keeps_its_figures():
    from odconv_deploy.complexity import measure_complexity
    from odconv_deploy.quantize import Int8Conv2d, quantize_conv_weights, stored_weight_bytes
    from odconv_deploy.reparameterize import find_odconv_layers

    names = [n for n, _ in find_odconv_layers(create_model("od_tinynet", kernel_num=4))]
    twin = synthesize_weights(create_model("tinynet")).double().eval()
    quantized = quantize_conv_weights(twin, names)
    convs = [m for m in quantized.modules() if isinstance(m, Int8Conv2d)]
    assert len(convs) == len(names) == 4
    float_twin = copy.deepcopy(twin)
    modules = dict(float_twin.named_modules())
    with torch.no_grad():
        for name, conv in zip(names, convs, strict=True):
            modules[name].weight.copy_(conv.weight_int8())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(quantized(x), float_twin(x), rtol=0, atol=1e-12)
    assert measure_complexity(quantized.float()).macs == measure_complexity(twin.float()).macs
    assert stored_weight_bytes(quantized) < stored_weight_bytes(twin)
    with pytest.raises(ODConvDeployError, match="'fc' is not a Conv2d.*found Linear"):
        quantize_conv_weights(twin, ["fc"])


def test_the_cli_refuses_a_precision_before_any_work(tmp_path, capsys):
    from odconv_deploy.cli import main

    out = tmp_path / "out"
    assert main(["export", "--model", "od_tinynet", "--precision", "fp16", "--formats",
                 "onnx,pte", "--out", str(out)]) == 3
    assert "take it are coreml" in capsys.readouterr().err
    assert not out.exists()
    assert main(["run", "--model", "tinynet", "--precision", "int8w", "--formats", "onnx",
                 "--bench-formats", "onnx-sim", "--out", str(out)]) == 1
    assert not (out / "artifacts").exists()


def test_validate_refuses_an_artifact_checked_at_another_weight_storage(int8w_artifacts,
                                                                         capsys):
    from odconv_deploy.cli import main

    _, _, results = int8w_artifacts
    onnx_path = str(results[ExportFormat.ONNX].path)
    assert main(["validate", "--model", "od_tinynet", "--onnx", onnx_path]) == 3
    assert "stores int8w weights (its metadata)" in capsys.readouterr().err
    # The CLI loads od_tinynet with the fixture's synthetic weights (seed 0): it passes.
    assert main(["validate", "--model", "od_tinynet", "--onnx", onnx_path, "--precision",
                 "int8w"]) == 0
    assert "torch int8w (kernel banks int8)" in capsys.readouterr().out


#: Formats checked per trained model. ExecuTorch lowering of od_mobilenetv2_digits' 51 ODConv
#: layers takes 2.5 min on this machine, so CI checks its .pte accuracy through
#: runtime_bench/precision_accuracy.py's committed results, and od_tinynet_digits' here.
ACCURACY_FORMATS = {
    "od_tinynet_digits": [ExportFormat.ORT, ExportFormat.EXECUTORCH, ExportFormat.COREML],
    "od_mobilenetv2_digits": [ExportFormat.ORT, ExportFormat.COREML],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ACCURACY_FORMATS))
def test_int8w_and_fp16_keep_the_top1_of_both_trained_models(tmp_path, name):
    """On the digits test set every artifact stays within 0.5 points of fp32 PyTorch."""
    from export.validation import accuracy_table, candidates_for
    from odconv_deploy.digits import load_digits_model, load_digits_test
    from odconv_deploy.runners import TorchRunner

    model = load_digits_model(name)
    test = load_digits_test(name)
    results = export_formats(model, tmp_path / "int8w", ACCURACY_FORMATS[name],
                             conversions=Conversions(model, "im2col", precision="int8w"),
                             measure_sizes=False)
    results += export_formats(model, tmp_path / "fp16", [ExportFormat.COREML],
                              precision="fp16", measure_sizes=False)
    assert all(r.ok for r in results), [r.error for r in results]
    rows = accuracy_table(TorchRunner(model, name="torch fp32"), candidates_for(results),
                          test.images, test.labels, batch=32)
    fp32 = rows[0].accuracy
    assert fp32 > 0.95
    measured = [r for r in rows[1:] if not r.skipped]
    # ONNX Runtime (onnx, onnx-sim, .ort), ExecuTorch where made, the MIL executor per package
    assert len(measured) >= len(ACCURACY_FORMATS[name]) + 1
    for row in measured:
        assert abs(row.accuracy - fp32) <= 0.005, (row.runner, row.accuracy, fp32)


def test_auto_keeps_int8w_layers_off_ort_nchwc():
    from odconv_deploy.layers.ort_nchwc import ort_nchwc_block

    model = synthesize_weights(create_model("od_resnet18", kernel_num=4)).eval()
    float_plan = Conversions(model, "auto").plan("onnxruntime", dynamic_batch=False)
    int8_plan = Conversions(model, "auto", precision="int8w").plan("onnxruntime",
                                                                    dynamic_batch=False)
    assert "ort_nchwc" not in int8_plan
    assert int8_plan == Conversions(model, "auto").plan("onnx", dynamic_batch=False)
    if ort_nchwc_block() is not None:  # where NCHWc kernels exist the float plan uses them
        assert "ort_nchwc" in float_plan
