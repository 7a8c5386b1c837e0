"""Users' own networks through every command: import strings, module files, deploy checkpoints.

The stand-in for a user's network is the detector of ``tests/detector_net.py`` (backbone, FPN
with upsampling and concat, three heads, SiLU, the pasted reference ODConv class, 256x320).
"""

import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from odconv_deploy.cli import main
from odconv_deploy.model_source import ModelSourceError, load_model, static_twin_of
from tests.detector_net import INPUT_SHAPE, NUM_FOLDABLE_BN, NUM_ODCONV, build_detector

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ",".join(map(str, INPUT_SHAPE))
DETECTOR = ["--model", "tests.detector_net:build_detector", "--model-args", "as_dict=True",
            "--input-shape", SHAPE]


@pytest.fixture(autouse=True)
def _from_the_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # import strings and pickled classes resolve from here


@pytest.fixture(scope="module")
def detector_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("det_run")
    code = main(["run", *DETECTOR, "--quick", "--bench-formats", "onnx-sim,pte,torch",
                 "--out", str(out)])
    return code, out


def test_run_on_the_detector_every_format_with_a_report(detector_run):
    code, out = detector_run
    report = json.loads((out / "report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert code == 0, {n: s["detail"] for n, s in steps.items()}
    assert all(s["status"] == "ok" for s in steps.values())
    assert steps["convert"]["data"]["layers"] == NUM_ODCONV
    assert steps["convert"]["data"]["folded_batchnorms"] == NUM_FOLDABLE_BN
    formats = {a["format"] for a in steps["export"]["data"]["artifacts"] if a["ok"]}
    assert formats == {"onnx", "onnx-sim", "ort", "coreml", "pte"}
    comparisons = steps["validate"]["data"]["validation"]["comparisons"]
    names = {o["name"] for c in comparisons for o in c["outputs"]}
    assert names == {"p3", "p4", "p5"}  # the dict's keys, figures per output
    assert all(o["top1_agreement"] is None for c in comparisons for o in c["outputs"])
    # Core ML fp16 through the MIL executor, rounded per op and with fp16 accumulation, each
    # within the tolerance the program's own rounding spreads give (not a constant).
    mil = {c["runner"]: c for c in comparisons if "(MIL" in c["runner"]}
    assert set(mil) == {"coreml fp16 (MIL, rounded per op)", "coreml fp16 (MIL, fp16 accumulation)"}
    assert all(c["passed"] for c in mil.values())
    per_op = [c["tolerance"]["rtol"] for c in mil.values() if "per op" in c["runner"]]
    assert max(per_op) < 3e-2 / 3
    rows = steps["benchmark"]["data"]["rows"]
    assert {(r["role"], r["model"]) for r in rows} == {("odconv", "build_detector"),
                                                       ("static", "build_detector_static")}
    assert all(r["ratio_to_static"] for r in rows if r["role"] == "odconv")
    md = (out / "report.md").read_text()
    assert "# odconv-deploy report: build_detector" in md and "| p5 |" in md
    assert (out / "odconv-deploy.log").is_file()


def test_detector_through_the_mil_executor_in_fp32(tmp_path, capsys):
    assert main(["export", *DETECTOR, "--formats", "coreml", "--coreml-precision", "fp32",
                 "--out", str(tmp_path)]) == 0
    code = main(["validate", *DETECTOR, "--coreml", str(tmp_path / "build_detector.mlpackage"),
                 "--json", str(tmp_path / "v.json")])  # the precision is read from the file
    assert code == 0, capsys.readouterr().out
    data = json.loads((tmp_path / "v.json").read_text())
    mil = [c for c in data["comparisons"] if "MIL" in c["runner"]]
    assert [c["batch"] for c in mil] == [1, 3] and all(c["passed"] for c in mil)
    assert {c["runner"] for c in mil} == {"coreml fp32 (MIL reference executor)"}
    for c in mil:
        assert c["tolerance"]["rtol"] == 1e-4  # the fp32 rule, from the file's precision
        assert {o["name"] for o in c["outputs"]} == {"p3", "p4", "p5"}


def test_convert_then_export_gives_the_artifacts_of_a_direct_export(tmp_path):
    deploy = tmp_path / "deploy.pt"
    assert main(["convert", *DETECTOR, "--out", str(deploy)]) == 0
    assert main(["export", *DETECTOR, "--formats", "onnx", "--out", str(tmp_path / "a")]) == 0
    assert main(["export", "--model", str(deploy), "--formats", "onnx", "--out",
                 str(tmp_path / "b")]) == 0
    direct = onnx.load(str(tmp_path / "a" / "build_detector.onnx"))
    via_file = onnx.load(str(tmp_path / "b" / "build_detector.onnx"))
    assert direct.SerializeToString() == via_file.SerializeToString()
    assert [o.name for o in direct.graph.output] == ["p3", "p4", "p5"]
    # the deploy checkpoint validates and benchmarks as well
    assert main(["validate", "--model", str(deploy), "--formats", "onnx,pte"]) == 0
    assert main(["bench", "--model", str(deploy), "--formats", "torch,onnx-sim", "--iterations",
                 "2", "--warmup", "0", "--out", str(tmp_path / "bench")]) == 0
    # and a deploy checkpoint cannot be given other model arguments
    assert main(["export", "--model", str(deploy), "--kernel-num", "2", "--out",
                 str(tmp_path / "c")]) == 3


def test_pickled_module_needs_the_opt_in(tmp_path, capsys):
    path = tmp_path / "det.pt"
    torch.save(build_detector(), path)
    args = ["validate", "--model", str(path), "--input-shape", SHAPE, "--formats", "onnx"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "runs code from the file" in err and "--trust-pickle" in err
    assert main(args + ["--trust-pickle"]) == 0
    assert "validation PASSED" in capsys.readouterr().out


def test_ultralytics_style_checkpoint(tmp_path, capsys):
    path = tmp_path / "last.pt"
    torch.save({"epoch": 3, "ema": None, "model": build_detector().half(),
                "optimizer": None}, path)
    loaded = load_model(path, input_shape=INPUT_SHAPE, trust_pickle=True)
    assert loaded.weights == "checkpoint['model'] of last.pt" and loaded.name == "last"
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert [t.name for t in loaded.io_spec.outputs] == ["output0", "output1", "output2"]
    assert main(["export", "--model", str(path), "--trust-pickle", "--input-shape", SHAPE,
                 "--formats", "onnx", "--out", str(tmp_path / "x")]) == 0


def test_static_twin_of_a_user_network_is_derived():
    loaded = load_model("tests.detector_net:build_detector", input_shape=INPUT_SHAPE)
    twin = static_twin_of(loaded)
    assert twin.name == "build_detector_static" and twin.io_spec == loaded.io_spec
    from odconv_deploy.reparameterize import find_odconv_layers

    assert find_odconv_layers(twin.model) == []
    with torch.no_grad():
        shapes = [o.shape for o in twin.model(*loaded.io_spec.sample_inputs(2))]
    assert shapes == [torch.Size((2,) + t.shape[1:]) for t in loaded.io_spec.outputs]


def test_several_inputs_by_name(tmp_path):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            from tests.reference_layer import PastedODConv2d

            self.conv = PastedODConv2d(4, 8, 3, padding=1, kernel_num=2)

        def forward(self, image, mask):
            return {"score": self.conv(image * mask).mean((2, 3))}

    loaded = load_model(TwoInputs(), input_shape=["image:1,4,16,16", "mask:1,1,16,16"])
    assert loaded.io_spec.input_names == ["image", "mask"]
    assert loaded.io_spec.output_names == ["score"]
    from export import export_formats, parse_formats
    from export.validation import validate_artifacts

    results = export_formats(loaded.model, tmp_path, parse_formats("onnx,pte"),
                             io_spec=loaded.io_spec)
    assert all(r.ok for r in results), [r.error for r in results]
    report = validate_artifacts(loaded.model, results, io_spec=loaded.io_spec)
    assert report.passed and report.comparisons


def test_a_network_without_odconv_still_exports(tmp_path):
    out = tmp_path / "run"
    code = main(["run", "--model", "torch.nn:Identity", "--input-shape", "1,3,8,8", "--quick",
                 "--formats", "onnx", "--bench-formats", "torch", "--out", str(out)])
    assert code == 0
    steps = {s["name"]: s for s in json.loads((out / "report.json").read_text())["steps"]}
    assert steps["convert"]["detail"].startswith("0 ODConv layers converted")
    assert steps["routing"]["status"] == "skipped" and "no ODConv layer" in steps[
        "routing"]["detail"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "tests.no_such_module:build"], "module 'tests.no_such_module' does not import"),
    (["--model", "tests.detector_net:nothing"], "has no attribute 'nothing'"),
    (["--model", "tests.detector_net:INPUT_SHAPE"], "neither callable nor an nn.Module"),
    (["--model", "tests.detector_net:output_shapes"], "returned a tuple, not a torch.nn.Module"),
    (["--model", "tests.detector_net:build_detector", "--model-args", "colour=1",
      "--input-shape", SHAPE], "unexpected keyword argument 'colour'"),
    (["--model", "tests.detector_net:build_detector", "--model-args", "oops"],
     "is not key=value"),
    (["--model", "tests.detector_net:build_detector"], "declares no input shape"),
    (["--model", "tests.detector_net:build_detector", "--input-shape", "1,3,x,320"],
     "is not a shape"),
    (["--model", "tests.detector_net:build_detector", "--input-shape", "2,3,256,320"],
     "has batch 2"),
    (["--model", "tests.detector_net:build_detector", "--input-shape", "1,4,256,320"],
     "fails to run on the input input[1, 4, 256, 320]"),
    (["--model", "resnet18", "--kernel-num", "2"], "static model; it takes no --kernel-num"),
    (["--model", "od_tinynet_digits", "--kernel-num", "2"], "fixed trained model"),
    (["--model", "no_such_model"], "neither a zoo model, an existing file, nor an import"),
])
def test_bad_model_sources_are_clear_user_errors(tmp_path, capsys, argv, message):
    assert main(["convert", *argv, "--out", str(tmp_path / "d.pt")]) == 3
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "d.pt").exists()


def test_files_that_are_no_model(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    state = tmp_path / "weights.pt"
    torch.save(build_detector().state_dict(), state)
    for path, message in ((text, "not a model file torch can read"),
                          (state, "It looks like a state_dict")):
        assert main(["export", "--model", str(path), "--out", str(tmp_path / "o")]) == 3
        assert message in capsys.readouterr().err
    with pytest.raises(ModelSourceError, match="is a folder"):
        load_model(tmp_path)


def test_python_api_validates_a_two_output_network_exported_with_input_shape(tmp_path):
    from export import export_formats, parse_formats
    from export.validation import validate_artifacts

    net = build_detector()
    results = export_formats(net, tmp_path, parse_formats("onnx,pte"), input_shape=INPUT_SHAPE)
    assert all(r.ok for r in results), [r.error for r in results]
    assert results[0].output_names == ["output0", "output1", "output2"]
    report = validate_artifacts(net, results, input_shape=INPUT_SHAPE, batches=(1,))
    assert report.passed and {o.name for c in report.comparisons for o in c.outputs} == {
        "output0", "output1", "output2"}
