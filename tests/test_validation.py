"""Validation: figures users can trust, and failures that cannot hide."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export import (
    export_coreml,
    export_executorch,
    export_formats,
    export_onnx,
    parse_formats,
)
from export.validation import accuracy_table, candidates_for, validate_artifacts
from odconv_deploy import convert_model, create_model
from odconv_deploy.digits import load_digits_model, load_digits_splits
from odconv_deploy.runners import OnnxRuntimeRunner, TorchRunner
from odconv_deploy.synthetic import synthesize_weights
from odconv_deploy.validation.compare import DEFAULT_TOLERANCES, compare_output
from odconv_deploy.validation.validate import Candidate, validate


@pytest.fixture(scope="module")
def tiny():
    return synthesize_weights(create_model("od_tinynet", kernel_num=4), seed=5)


def test_metrics_are_correct_on_known_arrays():
    ref = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    cand = ref.copy()
    cand[0, 2] = 3.3
    r = compare_output("y", ref, cand, DEFAULT_TOLERANCES["fp32"], classifier=True)
    assert r.max_abs == pytest.approx(0.3) and r.max_rel == pytest.approx(0.1)
    assert r.mean_abs == pytest.approx(0.05) and r.top1_agreement == 1.0
    noise = 0.09
    assert r.sqnr_db == pytest.approx(10 * np.log10((ref ** 2).sum() / noise))
    assert not r and "max|err|" in r.reason
    exact = compare_output("y", ref, ref, DEFAULT_TOLERANCES["fp32"])
    assert exact and exact.cosine == pytest.approx(1.0) and exact.sqnr_db == np.inf
    nan = cand.copy()
    nan[1, 1] = np.nan
    gated = compare_output("y", ref, nan, DEFAULT_TOLERANCES["fp16"])
    assert not gated and gated.non_finite == 1 and "non-finite" in gated.reason


def _export_and_validate(model, reference, tmp_path, **kwargs):
    onnx_result = export_onnx(model, tmp_path / "m.onnx", **kwargs)
    return onnx_result, validate_artifacts(reference, [onnx_result], io_spec=reference.io_spec)


def test_perturbed_weight_is_caught(tiny, tmp_path):
    result, report = _export_and_validate(tiny, tiny, tmp_path)
    assert report.passed
    proto = onnx.load(str(result.path))
    biggest = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    # All of one tensor by 1%: one element's effect on the logits can stay under the
    # tolerance (it did after the synthetic weights changed), which says nothing of the check.
    arr = numpy_helper.to_array(biggest).copy() * np.float32(1.01)
    biggest.CopyFrom(numpy_helper.from_array(arr, biggest.name))
    onnx.save(proto, str(result.path))
    report = validate_artifacts(tiny, [result], io_spec=tiny.io_spec)
    assert not report.passed
    failed = [c for c in report.comparisons if not c]
    assert failed and all(c.outputs[0].max_abs > 1e-4 for c in failed)
    assert "FAILED" in report.to_markdown()


def test_changed_activation_is_caught(tiny, tmp_path):
    result, _ = _export_and_validate(tiny, tiny, tmp_path)
    proto = onnx.load(str(result.path))
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    relu.op_type = "Sigmoid"
    onnx.save(proto, str(result.path))
    report = validate_artifacts(tiny, [result], io_spec=tiny.io_spec)
    assert not report.passed


def test_dropped_filter_attention_is_caught(tiny, tmp_path):
    deploy = convert_model(tiny).model
    layer = deploy.conv1  # has a filter head: saturate it so the attention becomes 1
    start, end = layer._head_slices[1]
    with torch.no_grad():
        layer.attention_heads.bias[start:end] = 100.0
    result = export_onnx(deploy, tmp_path / "nofilter.onnx")
    report = validate_artifacts(tiny, [result], io_spec=tiny.io_spec)
    assert not report.passed
    assert all(not c for c in report.comparisons)


def test_nan_inputs_are_reported(tiny, tmp_path):
    result = export_onnx(tiny, tmp_path / "m.onnx")
    report = validate_artifacts(tiny, [result], io_spec=tiny.io_spec, image_folder=None)
    assert report.passed and not report.input_issues
    from odconv_deploy.validation import inputs as module

    original = module.seeded_feed
    try:
        def poisoned(spec, batch, *, seed=0):
            feed = original(spec, batch, seed=seed)
            feed["image"][0, 0, 0, 0] = np.nan
            return feed
        module.seeded_feed = poisoned
        report = validate_artifacts(tiny, [result], io_spec=tiny.io_spec)
    finally:
        module.seeded_feed = original
    assert not report.passed and any("NaN" in i for i in report.input_issues)


def test_a_fixed_batch_none_of_the_batches_fit_fails_loudly(tiny, tmp_path):
    result = export_onnx(tiny, tmp_path / "b4.onnx", dynamic_batch=False, batch_size=4)
    runner = OnnxRuntimeRunner(result.path)
    report = validate(TorchRunner(tiny), [Candidate(runner, "fp32")], tiny.io_spec)
    assert not report.passed  # nothing compared is not a pass
    (only,) = report.comparisons
    assert "takes none of the batch sizes tried (1, 3)" in only.error and "batch 4" in only.error
    ok = validate(TorchRunner(tiny), [Candidate(runner, "fp32")], tiny.io_spec, batches=(4,))
    assert ok.passed and [c.batch for c in ok.comparisons] == [4]


def test_fp16_range_overflow_is_named(tiny, tmp_path):
    huge = synthesize_weights(create_model("od_tinynet", kernel_num=4), seed=5)
    with torch.no_grad():
        huge.fc.weight.mul_(1e7)
    result = export_onnx(huge, tmp_path / "h.onnx")
    runner = OnnxRuntimeRunner(result.path, name="pretend-fp16")
    report = validate(TorchRunner(huge), [Candidate(runner, "fp16")], huge.io_spec)
    assert not report.passed
    assert "beyond the fp16 range" in report.comparisons[0].outputs[0].reason


def test_report_json_and_skips_are_visible(tiny, tmp_path):
    results = export_formats(tiny, tmp_path, parse_formats("onnx,coreml"), stem="t")
    report = validate_artifacts(tiny, results, io_spec=tiny.io_spec,
                                deploy_model=convert_model(tiny).model)
    data = report.to_dict()
    assert data["comparisons"][0]["tolerance"]["rule"].startswith("max|err|")
    if report.skipped:  # CoreML predict off macOS: visible, with the reason
        assert any("macOS" in why for _, why in report.skipped)
        assert "skipped coreml" in report.to_markdown()


def test_trained_digits_accuracy_kept_by_every_artifact(tmp_path):
    model = load_digits_model()
    _, test = load_digits_splits()
    results = export_formats(model, tmp_path, parse_formats("onnx,onnx-sim,ort"),
                             stem="digits", io_spec=model.io_spec)
    results.append(export_executorch(model, tmp_path / "digits.pte"))
    for precision in ("fp32", "fp16"):
        results.append(export_coreml(model, tmp_path / f"digits_{precision}.mlpackage",
                                     precision=precision))
    cands = candidates_for(results, deploy_model=convert_model(model).model,
                           io_spec=model.io_spec)
    rows = accuracy_table(TorchRunner(model, name="torch"), cands, test.images, test.labels,
                          batch=32)
    assert rows[0].accuracy > 0.95
    checked = 0
    runtimes = [c for c in cands if not c.bound_only]  # the table leaves bounds out
    assert len(runtimes) < len(cands)
    for row, cand in zip(rows[1:], runtimes, strict=True):
        if row.skipped:  # CoreML predict off macOS: visible in the row
            assert "macOS" in row.skipped
            continue
        checked += 1
        # fp16 rounding may flip a near-tie image; fp32 artifacts must agree to 1 image.
        slack = 3 if cand.precision == "fp16" else 1
        assert row.accuracy == pytest.approx(rows[0].accuracy, abs=slack / len(test.labels))
        assert row.agreement >= 1 - slack / len(test.labels)
    assert checked >= 9  # deploy form, 4 ONNX runs, .ort, .pte, 2 CoreML MIL executions
