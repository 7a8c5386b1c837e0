"""lut6w: ODConv kernel banks palettized (64 values per bank), stored as Core ML lookup tables."""

import numpy as np
import pytest
import torch

from export.result import ExportError, ExportFormat
from export.run import export_formats
from export.to_coreml import export_coreml, iter_mil_ops
from export.validation import PALETTIZED_REFERENCE, validate_artifacts
from odconv_deploy.conversions import Conversions
from odconv_deploy.errors import ODConvDeployError
from odconv_deploy.layers.deploy import ODConv2dDeploy
from odconv_deploy.model_source import load_model
from odconv_deploy.quantize import (
    LUT_BITS,
    has_palettized_banks,
    palettize_kernel_banks,
    quantize_kernel_banks,
    weight_storage,
)

pytest.importorskip("coremltools")
pytest.importorskip("sklearn")


def banks(model):
    return [m.canonical_weight() for m in model.modules() if isinstance(m, ODConv2dDeploy)]


@pytest.fixture(scope="module")
def tinynet():
    loaded = load_model("od_tinynet_digits")
    return loaded, Conversions(loaded.model, "im2col", precision="lut6w")


def test_each_bank_takes_64_values_near_its_own(tinynet):
    _, conversions = tinynet
    result = conversions.get("coreml")
    assert has_palettized_banks(result.model) and weight_storage(result.model) == "lut6w"
    for palettized, original in zip(banks(result.model), banks(result.float_model), strict=True):
        assert len(torch.unique(palettized)) <= 2 ** LUT_BITS
        # each weight took a centroid near it: the error is a fraction of the bank's range
        spread = original.max() - original.min()
        assert 0 < (palettized - original).abs().max() < spread / 4
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref, got = result.float_model(x), result.model(x)
    assert 1e-4 < ((got - ref).abs().max() / ref.abs().max()).item() < 0.2


def test_palettizing_refuses_what_it_cannot_take(tinynet):
    _, conversions = tinynet
    with pytest.raises(ODConvDeployError, match="no ODConv deploy layer"):
        palettize_kernel_banks(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3)))
    int8 = quantize_kernel_banks(conversions.get("coreml").float_model)
    with pytest.raises(ODConvDeployError, match="already stored int8"):
        palettize_kernel_banks(int8)
    with pytest.raises(ExportError, match="lut6w is not made for onnx, pte.*take it are coreml"):
        export_formats(conversions.model, "unused", [ExportFormat.ONNX, ExportFormat.EXECUTORCH],
                       conversions=conversions)


@pytest.fixture(scope="module")
def lut_package(tinynet, tmp_path_factory):
    loaded, conversions = tinynet
    out = tmp_path_factory.mktemp("lut6w")
    (result,) = export_formats(loaded.model, out, [ExportFormat.COREML], conversions=conversions,
                               io_spec=loaded.io_spec, coreml_precision="fp32")
    assert result.ok, result.error
    return result


def test_the_package_stores_every_bank_as_a_lookup_table(lut_package):
    from odconv_deploy.runners.mil import load_mil_program

    ops = [op for op in iter_mil_ops(load_mil_program(str(lut_package.path)))
           if op.op_type == "constexpr_lut_to_dense"]
    shapes = {tuple(op.outputs[0].shape) for op in ops}
    assert len(ops) >= 4 and {(4608, 4), (288, 4), (2048, 4)} <= shapes
    assert lut_package.options["weights"] == "lut6w"
    assert lut_package.options["minimum_deployment_target"] == "iOS16"


def test_the_package_matches_the_palettized_model_not_the_float_one(tinynet, lut_package):
    loaded, conversions = tinynet
    result = conversions.get("coreml")
    good = validate_artifacts(loaded.model, [lut_package], io_spec=loaded.io_spec,
                              deploy_model=result.model, quantized=True)
    assert good.reference == PALETTIZED_REFERENCE
    assert good.passed and good.comparisons, good.to_markdown()
    against_float = validate_artifacts(loaded.model, [lut_package], io_spec=loaded.io_spec)
    assert not against_float.passed  # what palettizing costs is drift, not an export error


def test_a_palettized_bank_needs_ios16(tinynet, tmp_path):
    _, conversions = tinynet
    with pytest.raises(ExportError, match="palettized kernel banks need "
                                          "minimum_deployment_target iOS16"):
        export_coreml(conversions.get("coreml").model, tmp_path / "m.mlpackage",
                      minimum_deployment_target="iOS15")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["od_tinynet_digits", "od_mobilenetv2_digits"])
def test_lut6w_keeps_the_top1_of_both_trained_models(tmp_path, name):
    from export.validation import accuracy_table, candidates_for
    from odconv_deploy.digits import load_digits_test
    from odconv_deploy.runners import TorchRunner

    loaded = load_model(name)
    (result,) = export_formats(loaded.model, tmp_path, [ExportFormat.COREML],
                               conversions=Conversions(loaded.model, "im2col",
                                                       precision="lut6w"),
                               io_spec=loaded.io_spec, measure_sizes=False)
    assert result.ok, result.error
    test = load_digits_test(name)
    rows = accuracy_table(TorchRunner(loaded.model, name="torch fp32"), candidates_for([result]),
                          test.images, test.labels, batch=32)
    measured = [r for r in rows[1:] if not r.skipped]
    assert measured and rows[0].accuracy > 0.95
    for row in measured:
        assert abs(row.accuracy - rows[0].accuracy) <= 0.005, (row.runner, row.accuracy)
    assert np.isfinite([r.accuracy for r in measured]).all()


def test_the_size_split_finds_the_palettized_banks(tinynet, lut_package):
    from export.sizes import kernel_banks, size_split

    _, conversions = tinynet
    split = size_split(lut_package, kernel_banks(conversions.get("coreml").model))
    assert split["banks_found"] == split["banks"] == 4
    float_bytes = sum(b.nbytes for b in kernel_banks(conversions.get("coreml").float_model))
    # 6-bit indices and a 64-entry table per bank: about 6/32 of the float32 banks
    assert 0.15 * float_bytes < split["kernel_bank_bytes"] < 0.25 * float_bytes
