"""The CLI's contract: every command on every zoo model, documented exit codes, no tracebacks,
and one conversion per distinct per-layer plan in a run."""

import shutil
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import odconv_deploy.conversions as conversions_module
import odconv_deploy.reparameterize as reparameterize_module
from odconv_deploy.cli import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USAGE, EXIT_USER_ERROR, main
from odconv_deploy.conversions import Conversions
from odconv_deploy.digits import DIGITS_MODELS
from odconv_deploy.model_source import load_model, zoo_names

DOCUMENTED = {EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_USER_ERROR}


def test_run_with_auto_converts_once_per_distinct_plan(tmp_path, monkeypatch):
    calls, verified = [], []
    real_convert, real_verify = conversions_module.convert_model, reparameterize_module.verify_layer

    def counting_convert(model, **kwargs):
        calls.append((kwargs["target"], kwargs["dynamic_batch"]))
        return real_convert(model, **kwargs)

    def counting_verify(*args, **kwargs):
        verified.append(args[3])
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(conversions_module, "convert_model", counting_convert)
    monkeypatch.setattr(reparameterize_module, "verify_layer", counting_verify)
    code = main(["run", "--model", "od_tinynet", "--kernel-num", "2", "--strategy", "auto",
                 "--quick", "--formats", "onnx,onnx-sim,ort,coreml,pte", "--bench-formats",
                 "onnx-sim,pte,torch", "--out", str(tmp_path)])
    assert code == 0
    plans = Conversions(load_model("od_tinynet", kernel_num=2).model, "auto")
    distinct = {plans.plan(target, True) for target in ("torch", "onnx", "coreml", "executorch")}
    assert len(distinct) == 2  # im2col everywhere (torch, coreml); depthwise_taps (onnx, pte)
    # the fixed-batch-1 benchmark's graphs: ONNX Runtime's plan, and ExecuTorch's (as above)
    distinct |= {plans.plan("onnxruntime", False), plans.plan("executorch", False)}
    assert len(distinct) == 3
    assert len(calls) == len(distinct)
    # every verification came from those conversions: nothing converted behind their back
    assert len(verified) == len(calls) * plans.layer_count


def _smoke_args(name: str) -> list[str]:
    """Small, fast settings for zoo model ``name``."""
    if name in DIGITS_MODELS:
        return ["--model", name]
    args = ["--model", name, "--input-shape", "1,3,32,32"]
    return args + (["--kernel-num", "1"] if name.startswith("od_") else [])


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo_names())
def test_every_command_on_every_zoo_model(tmp_path, capsys, name):
    """convert, then export / validate / bench / run from its deploy checkpoint (small input)."""
    deploy = tmp_path / "deploy.pt"
    onnx_file = tmp_path / "export" / f"{name}.onnx"
    commands = [
        ["convert", *_smoke_args(name), "--out", str(deploy)],
        ["export", "--model", str(deploy), "--formats", "onnx", "--out", str(tmp_path / "export")],
        ["validate", "--model", str(deploy), "--onnx", str(onnx_file), "--batch", "2"],
        ["bench", "--model", str(deploy), "--formats", "torch", "--iterations", "1",
         "--warmup", "0", "--out", str(tmp_path / "bench")],
        ["run", "--model", str(deploy), "--formats", "onnx", "--bench-formats", "torch", "--quick",
         "--out", str(tmp_path / "run")],
    ]
    for argv in commands:
        code = main(argv)
        captured = capsys.readouterr()
        assert code == EXIT_OK, (argv, captured.err[-2000:])
        assert "Traceback" not in captured.out + captured.err


# -- generated argument lists --------------------------------------------------------------
_VALUES = st.one_of(
    st.sampled_from(["od_tinynet", "tinynet", "resnet18", "od_tinynet_digits", "nope",
                     "tests.detector_net:nothing", "os:getcwd", "1,3,32,32", "1,3,x", "0", "-1",
                     "2", "1,2", "onnx", "tflite", "ort", "onnx-sim", "torch", "auto", "im2col",
                     ""]),
    # no digits: a generated number could ask for a huge batch; the sizes above are small
    st.text(alphabet=string.ascii_letters + ",:=.-_", max_size=12),
)
_FLAGS = st.sampled_from(["--model", "--kernel-num", "--input-shape", "--model-args",
                          "--formats", "--backends", "--batch", "--batches", "--strategy",
                          "--batch-size", "--iterations", "--checkpoint", "--images",
                          "--static-batch", "--bogus", "--threads", "--warmup", "--fixed-batch",
                          "--bench-formats"])
_ARGS = st.lists(st.tuples(_FLAGS, _VALUES), max_size=5)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["convert", "export", "validate", "bench", "run", "models",
                                "nonsense"]), pairs=_ARGS)
def test_generated_command_lines_end_in_documented_exit_codes(tmp_path_factory, capsys,
                                                              command, pairs):
    out = tmp_path_factory.mktemp("gen")
    argv = [command] + [item for flag, value in pairs for item in (flag, value)]
    # keep the valid ones small and their outputs inside the test's folder
    if command in ("export", "bench", "run"):
        argv += ["--out", str(out / "o")]
    elif command == "convert":
        argv += ["--out", str(out / "d.pt")]
    if command in ("export", "validate", "run") and "--formats" not in argv:
        argv += ["--formats", "onnx"]
    if command == "bench" and not {"--formats", "--backends"} & set(argv):
        argv += ["--formats", "torch"]
    if command == "run" and not {"--bench-formats", "--backends"} & set(argv):
        argv += ["--bench-formats", "torch"]
    if command == "bench":
        argv += ["--iterations", "1", "--warmup", "0"]
    if command == "run":
        argv += ["--quick"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code in DOCUMENTED, (argv, code, captured.err[-2000:])
    assert "Traceback" not in captured.out + captured.err, argv
    shutil.rmtree(out)  # 40 examples, some exporting a zoo model: keep the disk free
