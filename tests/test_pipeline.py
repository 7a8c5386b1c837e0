"""The main job end to end: report contents, partial results, exit codes."""

import json

import pytest

import export.run as export_run
from odconv_deploy.cli import main
from odconv_deploy.pipeline import PipelineOptions, run_pipeline


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # strategy auto: each format gets its own per-layer forms (the depthwise conv2 differs).
    code = main(["run", "--model", "od_tinynet_digits", "--quick", "--strategy", "auto",
                 "--formats", "onnx,onnx-sim,ort,pte", "--bench-formats", "onnx-sim,pte",
                 "--out", str(out)])
    return code, out


def test_run_writes_complete_report(digits_run):
    code, out = digits_run
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["load", "convert", "export", "validate", "routing", "benchmark"]
    assert all(s["status"] == "ok" for s in steps.values())
    assert steps["convert"]["data"]["worst_layer_error_fp64"] < 1e-10
    accuracy = steps["validate"]["data"]["accuracy"]
    assert accuracy[0]["accuracy"] > 0.95 and all(r["agreement"] >= 0.99 for r in accuracy)
    md = (out / "report.md").read_text()
    for heading in ("## Artifacts", "## Validation", "### Test accuracy",
                    "## Routing agreement", "## Latency", "## Environment"):
        assert heading in md
    routing = steps["routing"]["data"]["routing"]
    assert {r["runner"] for r in routing["runs"]} == {
        "onnxruntime onnx (opt off)", "onnxruntime onnx (opt full)", "executorch (xnnpack)"}
    assert all(r["passed"] and len(r["layers"]) == 4 for r in routing["runs"])
    assert "| onnx | `od_tinynet_digits.onnx` | " in md
    assert "layers: depthwise_taps:1,im2col:3" in md  # ONNX (dynamic batch) and .pte alike
    assert (out / "artifacts" / "od_tinynet_digits.ort").is_file()
    assert (out / "bench" / "latency.png").is_file()
    assert (out / "od_tinynet_digits_deploy.pt").is_file()
    # beside the dynamic-batch artifacts, what a batch-1 deployment ships, with its ratio
    assert "## Latency, fixed batch 1 (what you would ship)" in md
    fixed = steps["benchmark"]["data"]["fixed_batch1_rows"]
    assert {(r["format"], r["role"]) for r in fixed} == {
        (f, role) for f in ("onnx-sim", "pte") for role in ("odconv", "static")}
    assert all(r["ratio_to_static"]["rounds"] == 5 for r in fixed if r["role"] == "odconv")
    assert "fixed batch 1 auto" in steps["benchmark"]["detail"]


def test_existing_report_is_not_overwritten(digits_run, capsys):
    _, out = digits_run
    assert main(["run", "--model", "od_tinynet_digits", "--out", str(out)]) == 3
    assert "already exists" in capsys.readouterr().err


def test_failed_step_is_recorded_and_later_steps_still_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated converter crash")

    monkeypatch.setattr(export_run, "export_ort", broken)
    options = PipelineOptions(model="od_tinynet", kernel_num=2, quick=True,
                              formats=("onnx", "onnx-sim", "ort"), bench_formats=("torch",),
                              out=str(tmp_path))
    report = run_pipeline(options)
    assert not report.ok
    steps = {s.name: s for s in report.steps}
    assert steps["export"].status == "failed" and "ort" in steps["export"].detail
    assert steps["validate"].status == "ok" and steps["benchmark"].status == "ok"
    assert steps["routing"].status == "ok"  # the ONNX export it probes did not fail
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["ok"] is False
    assert "simulated converter crash" in (tmp_path / "report.md").read_text()


def test_an_int8w_run_checks_against_the_quantized_model_and_reports_the_drift(tmp_path):
    out = tmp_path / "int8w"
    code = main(["run", "--model", "od_tinynet_digits", "--quick", "--precision", "int8w",
                 "--formats", "onnx,ort", "--bench-formats", "onnx-sim", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert all(s["status"] == "ok" for s in steps.values()), steps
    drift = steps["convert"]["data"]["drift"]
    assert [d["inputs"] for d in drift] == ["32 seeded inputs",
                                           "the digits test set (359 images)"]
    test_set = drift[1]["outputs"][0]
    assert 25 < test_set["sqnr_db"] < 80 and test_set["top1_agreement"] > 0.99
    assert len(drift[1]["kernel_choices"]) == 4
    validation = steps["validate"]["data"]["validation"]
    assert validation["reference"] == "torch int8w (kernel banks int8)" and validation["passed"]
    accuracy = steps["validate"]["data"]["accuracy"]
    assert accuracy[0]["runner"] == "torch (train form)"
    assert all(abs(r["accuracy"] - accuracy[0]["accuracy"]) <= 0.005 for r in accuracy[1:])
    rows = steps["benchmark"]["data"]["rows"]
    assert {r["model"] for r in rows if r["role"] == "static"} == {"tinynet_int8w"}
    md = (out / "report.md").read_text()
    assert "## Quantization drift" in md and "kernel-choice agreement" in md.lower()
    # the deploy checkpoint keeps the float conversion (it loads like any other)
    assert (out / "od_tinynet_digits_deploy.pt").is_file()
