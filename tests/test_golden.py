"""Golden outputs: recorded where Core ML runs, checked anywhere. Core ML predict needs macOS,
so the goldens here are written by the test (the MIL executor's outputs standing in for
predict's, or those outputs perturbed); the recording command is checked up to the point where
it needs predict."""

import json
import sys

import numpy as np
import pytest

pytest.importorskip("coremltools")

from odconv_deploy.cli import EXIT_CHECK_FAILED, EXIT_OK, EXIT_USER_ERROR, main  # noqa: E402
from odconv_deploy.model_source import load_model  # noqa: E402
from odconv_deploy.runners import MILReferenceRunner  # noqa: E402
from odconv_deploy.runners.base import RunnerError  # noqa: E402
from odconv_deploy.validation.golden import (  # noqa: E402
    GOLDEN_ARRAYS,
    GOLDEN_META,
    GoldenError,
    GoldenRunner,
    artifact_digest,
    check_golden_artifact,
    read_golden,
    record_golden,
    write_golden,
)
from odconv_deploy.validation.inputs import validation_feeds  # noqa: E402

MODEL = ["--model", "od_tinynet", "--kernel-num", "2"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden_artifact")
    assert main(["export", *MODEL, "--formats", "coreml", "--out", str(out)]) == EXIT_OK
    (path,) = out.glob("*.mlpackage")
    return path


@pytest.fixture(scope="module")
def feeds():
    return validation_feeds(load_model("od_tinynet", kernel_num=2).io_spec, [1, 3], seed=0)


def stand_in_golden(artifact, feeds, scale=1.0):
    """Goldens as predict would record them; the MIL executor stands in for predict here."""
    golden = record_golden(MILReferenceRunner(str(artifact), name="MIL standing in for predict"),
                           feeds, str(artifact), precision="fp16",
                           environment={"platform": sys.platform})
    golden.outputs = {b: {k: v * np.float32(scale) for k, v in o.items()}
                      for b, o in golden.outputs.items()}
    return golden


def test_write_read_round_trip_is_exact(tmp_path, artifact, feeds):
    golden = stand_in_golden(artifact, feeds)
    write_golden(golden, tmp_path / "g")
    again = read_golden(tmp_path / "g")
    assert again.batches == [1, 3] and again.digest == artifact_digest(artifact)
    assert again.producer == golden.producer and again.precision == "fp16"
    for b in again.batches:
        for name in golden.feeds[b]:
            np.testing.assert_array_equal(again.feeds[b][name], golden.feeds[b][name])
        for name in golden.outputs[b]:
            np.testing.assert_array_equal(again.outputs[b][name], golden.outputs[b][name])
    with pytest.raises(Exception, match="already exists"):
        write_golden(golden, tmp_path / "g")  # whole or not at all, never over an old one


def test_golden_runner_refuses_inputs_it_did_not_record(artifact, feeds):
    runner = GoldenRunner(stand_in_golden(artifact, feeds))
    with runner:
        assert set(runner.infer(feeds[3])) == {"logits"}
        with pytest.raises(RunnerError, match="differ from the recorded"):
            runner.infer({"image": feeds[3]["image"] + 1})
        with pytest.raises(RunnerError, match="recorded batches"):
            runner.infer({"image": np.zeros((2, 3, 32, 32), np.float32)})


def test_bad_golden_folders_are_refused_with_the_reason(tmp_path, artifact, feeds):
    with pytest.raises(GoldenError, match="not a golden folder"):
        read_golden(tmp_path / "missing")
    write_golden(stand_in_golden(artifact, feeds), tmp_path / "g")
    (tmp_path / "g" / GOLDEN_ARRAYS).write_bytes(b"not an npz")
    with pytest.raises(GoldenError, match="unreadable"):
        read_golden(tmp_path / "g")
    write_golden(stand_in_golden(artifact, feeds), tmp_path / "h")
    meta = json.loads((tmp_path / "h" / GOLDEN_META).read_text())
    meta["digest"] = "0" * 64
    (tmp_path / "h" / GOLDEN_META).write_text(json.dumps(meta))
    with pytest.raises(GoldenError, match="recorded for"):
        check_golden_artifact(read_golden(tmp_path / "h"), artifact)


def test_validate_against_goldens_passes_and_a_5_percent_difference_fails(tmp_path, artifact,
                                                                          feeds, capsys):
    write_golden(stand_in_golden(artifact, feeds), tmp_path / "good")
    write_golden(stand_in_golden(artifact, feeds, scale=1.05), tmp_path / "off")
    base = ["validate", *MODEL, "--coreml", str(artifact), "--no-routing"]
    assert main([*base, "--golden", str(tmp_path / "good"), "--json",
                 str(tmp_path / "good.json")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "Against the golden outputs" in out and "golden: MIL standing in for predict" in out
    data = json.loads((tmp_path / "good.json").read_text())
    assert data["golden"]["passed"] and data["golden"]["comparisons"]
    assert main([*base, "--golden", str(tmp_path / "off")]) == EXIT_CHECK_FAILED
    assert "validation FAILED" in capsys.readouterr().out


def test_golden_flags_are_checked_before_any_work(tmp_path, artifact, capsys):
    assert main(["validate", *MODEL, "--golden", str(tmp_path)]) == EXIT_USER_ERROR
    assert "--coreml" in capsys.readouterr().err
    assert main(["validate", *MODEL, "--coreml", str(artifact), "--golden",
                 str(tmp_path / "none")]) == EXIT_USER_ERROR
    assert "not a golden folder" in capsys.readouterr().err
    if sys.platform != "darwin":
        assert main(["validate", *MODEL, "--coreml", str(artifact), "--record-golden",
                     str(tmp_path / "rec")]) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert "needs macOS" in err and "--golden" in err
        assert not (tmp_path / "rec").exists()
