"""The size split of artifacts: ODConv kernel banks found in the files by content."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from export.result import ExportFormat, ExportResult
from export.run import export_formats
from export.sizes import kernel_banks, size_split
from odconv_deploy import create_model
from odconv_deploy.conversions import Conversions
from odconv_deploy.synthetic import synthesize_weights


def onnx_with(tmp_path, tensors):
    graph = helper.make_graph([], "g", [], [], initializer=[
        numpy_helper.from_array(t, f"t{i}") for i, t in enumerate(tensors)])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return ExportResult(ExportFormat.ONNX, path, [], [], {}, {}, path.stat().st_size)


def test_banks_are_found_in_any_layout_and_a_changed_one_is_not(tmp_path):
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((4, 8, 3, 3, 3)).astype(np.float32) for _ in range(2))
    result = onnx_with(tmp_path, [a.reshape(4, -1).T.copy(), b * 2, np.ones(10, np.float32)])
    split = size_split(result, [a, b])
    assert split["banks"] == 2 and split["banks_found"] == 1  # b was changed: not b any more
    assert split["kernel_bank_bytes"] == a.nbytes
    assert split["rest_bytes"] == result.file_size_bytes - a.nbytes


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = synthesize_weights(create_model("od_tinynet", kernel_num=4))
    conversions = Conversions(model, "im2col")
    results = export_formats(model, tmp_path_factory.mktemp("sizes"),
                             [ExportFormat.ONNX, ExportFormat.ONNX_SIMPLIFIED, ExportFormat.ORT,
                              ExportFormat.COREML], conversions=conversions)
    banks = kernel_banks(conversions.get("onnx", True).model)
    return {r.format: r for r in results}, banks


def test_every_bank_is_found_in_onnx_and_coreml_at_its_stored_precision(exported):
    results, banks = exported
    assert len(banks) == 4
    fp32 = sum(b.nbytes for b in banks)
    for fmt, expect in ((ExportFormat.ONNX, fp32), (ExportFormat.ONNX_SIMPLIFIED, fp32),
                        (ExportFormat.COREML, fp32 // 2)):  # the Core ML default is fp16
        split = results[fmt].details["size_split"]
        assert split == {"kernel_bank_bytes": expect,
                         "rest_bytes": results[fmt].file_size_bytes - expect,
                         "banks_found": 4, "banks": 4}, fmt
    assert "size_split" not in results[ExportFormat.ORT].details  # its flatbuffer is not read


def test_no_split_without_odconv_layers(exported):
    results, _ = exported
    assert size_split(results[ExportFormat.ONNX], []) is None


def test_core_ml_packages_store_no_zero_bias_for_the_aggregation(tmp_path):
    """The aggregation's bias-less linear becomes a matmul: no bank row of zeros is stored."""
    pytest.importorskip("coremltools")
    import numpy as np

    from export.result import ExportFormat
    from export.run import export_formats
    from export.to_coreml import iter_mil_ops
    from odconv_deploy.digits import load_digits_model
    from odconv_deploy.runners.mil import load_mil_program

    (result,) = export_formats(load_digits_model(), tmp_path, [ExportFormat.COREML],
                               measure_sizes=False)
    assert result.ok, result.error
    ops = list(iter_mil_ops(load_mil_program(str(result.path))))
    zeros = [op.name for op in ops if op.op_type == "const" and op.outputs[0].val is not None
             and np.asarray(op.outputs[0].val).size >= 256
             and not np.asarray(op.outputs[0].val).any()]
    assert zeros == []
    assert sum(op.op_type == "matmul" for op in ops) >= 4  # one aggregation per ODConv layer
