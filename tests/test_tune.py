"""``tune``: forms chosen by timing, among exact forms only, cached per geometry/runtime/CPU."""

import json

import pytest

from odconv_deploy.cli import main
from odconv_deploy.conversions import Conversions
from odconv_deploy.detect import inspect_odconv
from odconv_deploy.devices import EmulatedArm64Device
from odconv_deploy.model_source import load_model
from odconv_deploy.reparameterize import find_odconv_layers
from odconv_deploy.strategy_choice import AutoStrategy, admissible_forms
from odconv_deploy.tolerance import within_tolerance
from runtime_bench.tune import TuneSettings, TuningCache, tune_plan, tuning_key

QUICK = TuneSettings(warmup=1, rounds=3)


@pytest.fixture(scope="module")
def digits():
    loaded = load_model("od_tinynet_digits")
    specs = [inspect_odconv(layer, name) for name, layer in find_odconv_layers(loaded.model)]
    return loaded, specs


def test_each_target_admits_only_the_forms_it_can_run(digits):
    _, specs = digits
    regular, depthwise = specs[0], next(s for s in specs if s.depthwise)
    assert admissible_forms(regular, "executorch", True) == ("im2col", "static_weight")
    assert admissible_forms(depthwise, "executorch", False) == ("im2col", "static_weight",
                                                                 "depthwise_taps")
    # a run-time conv weight bakes the batch in: fixed-batch ONNX graphs only
    assert "dynamic_weight" not in admissible_forms(regular, "onnx", True)
    assert "dynamic_weight" in admissible_forms(regular, "onnx", False)
    assert "ort_nchwc" not in admissible_forms(regular, "onnx", False)  # ORT's CPU only
    # XNNPACK's fully-connected takes a run-time weight: fixed-batch programs, regular
    # stride-1 layers
    pointwise = specs[2]  # conv3: 1x1, stride 1
    assert "dynamic_linear" in admissible_forms(pointwise, "executorch", False)
    assert "dynamic_linear" not in admissible_forms(pointwise, "executorch", True)
    assert "dynamic_linear" not in admissible_forms(regular, "executorch", False)  # stride 2
    assert "dynamic_linear" not in admissible_forms(depthwise, "executorch", False)
    assert "dynamic_linear" not in admissible_forms(pointwise, "onnxruntime", False)


def test_the_cache_key_changes_with_runtime_version_cpu_and_geometry(digits):
    _, specs = digits
    base = dict(target="onnxruntime", dynamic_batch=False, runtime="onnxruntime",
                runtime_version="1.32.0", cpu="Cortex-A76 [asimd asimddp]", threads=1)
    key = tuning_key(specs[0], (1, 16, 8, 8), **base)
    assert key == tuning_key(specs[0], (1, 16, 8, 8), **base)  # stable
    changed = [tuning_key(specs[0], (1, 16, 8, 8), **{**base, field: value})
               for field, value in (("runtime_version", "1.33.0"),
                                    ("cpu", "Cortex-A55 [asimd asimddp]"), ("threads", 2),
                                    ("runtime", "executorch"), ("dynamic_batch", True))]
    changed += [tuning_key(specs[0], (1, 16, 16, 16), **base), tuning_key(specs[1],
                                                                          (1, 16, 8, 8), **base)]
    assert key not in changed and len(set(changed)) == len(changed)


@pytest.mark.parametrize("target,dynamic_batch", [("onnxruntime", False), ("executorch", True)])
def test_tune_picks_the_fastest_exact_form_and_the_conversion_is_verified(
        digits, tmp_path, target, dynamic_batch):
    loaded, specs = digits
    cache = TuningCache(tmp_path / "tuning.json")
    plan = tune_plan(loaded.model, loaded.io_spec, target, dynamic_batch=dynamic_batch,
                     cache=cache, settings=QUICK)
    assert len(plan.forms) == len(specs) and plan.where == "host"
    for spec, choice in zip(specs, plan.layers, strict=True):
        assert set(choice.timings_ms) == set(admissible_forms(spec, target, dynamic_batch))
        assert choice.chosen == min(choice.timings_ms, key=choice.timings_ms.get)
        assert all(t > 0 for t in choice.timings_ms.values()) and not choice.cached
    # the plan goes through the one verified conversion, like any strategy's
    conversions = Conversions(loaded.model, "tune")
    conversions.set_tuned_plan(target, dynamic_batch, plan.forms)
    result = conversions.get(target, dynamic_batch)
    assert tuple(layer.form for layer in result.layers) == plan.forms
    assert all(layer.max_abs_error is not None  # verified in float64, to rounding
               and within_tolerance(layer.max_abs_error, layer.reference_scale, rtol=1e-10,
                                    atol=1e-12) for layer in result.layers)
    # timed once: the same geometry on the same runtime and CPU comes from the cache
    again = tune_plan(loaded.model, loaded.io_spec, target, dynamic_batch=dynamic_batch,
                      cache=TuningCache(tmp_path / "tuning.json"), settings=QUICK)
    assert all(c.cached for c in again.layers) and again.forms == plan.forms


def test_an_emulated_device_or_an_untimed_target_keeps_autos_rules(digits, tmp_path):
    loaded, specs = digits
    for target, device in (("executorch", EmulatedArm64Device("cortex-a55")), ("coreml", None)):
        plan = tune_plan(loaded.model, loaded.io_spec, target, device=device,
                         cache=TuningCache(tmp_path / "t.json"))
        assert plan.forms == tuple(AutoStrategy(target).choose(s) for s in specs)
        assert not plan.layers and "auto's rules decide" in plan.note
    assert not (tmp_path / "t.json").exists()


def test_export_with_tune_records_the_plan(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ODCONV_DEPLOY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["export", "--model", "od_tinynet_digits", "--strategy", "tune",
                 "--formats", "onnx", "--fixed-batch", "1", "--onnx-target", "onnxruntime",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Tuned plan for onnxruntime (fixed batch) on host" in text
    (plan,) = json.loads((out / "tuning.json").read_text())
    assert plan["target"] == "onnxruntime" and len(plan["forms"]) == 4
    assert (tmp_path / "cache" / "tuning.json").exists()


@pytest.mark.parametrize("whole_graph_ms", [None, {"tune": 2.0, "auto": 1.0}])
def test_a_tuned_plan_that_differs_from_autos_is_timed_whole_and_the_faster_kept(
        digits, tmp_path, monkeypatch, whole_graph_ms):
    """Layer timings that favour static_weight make the plan differ from auto's; the whole
    graphs are then timed (for real, or with the given figures) and the faster plan is kept."""
    import runtime_bench.tune as tune

    loaded, specs = digits
    real_time_forms = tune._time_forms

    def timings(results, inputs, device, settings):
        if set(results) == {"tune", "auto"}:
            assert all(r.path.stat().st_size > 0 for r in results.values())  # real exports
            return (real_time_forms(results, inputs, device, settings)
                    if whole_graph_ms is None else whole_graph_ms)
        return {form: 1.0 if form == "static_weight" else 2.0 for form in results}

    monkeypatch.setattr(tune, "_time_forms", timings)
    plan = tune_plan(loaded.model, loaded.io_spec, "executorch", dynamic_batch=False,
                     cache=TuningCache(tmp_path / "tuning.json"), settings=QUICK)
    auto_forms = tuple(AutoStrategy("executorch", False).choose(s) for s in specs)
    tuned = ("static_weight",) * len(specs)
    check = plan.whole_graph
    assert check is not None and check.tuned_ms > 0 and check.auto_ms > 0
    faster = "tune" if check.tuned_ms <= check.auto_ms else "auto"
    assert check.kept == faster
    assert plan.forms == (tuned if faster == "tune" else auto_forms)
    assert [c.chosen for c in plan.layers] == list(tuned)  # the layer timings stay on record
    assert "Whole graph: tuned plan" in plan.to_markdown()
    # the second run takes the whole-graph figures from the cache, with the same outcome
    again = tune_plan(loaded.model, loaded.io_spec, "executorch", dynamic_batch=False,
                      cache=TuningCache(tmp_path / "tuning.json"), settings=QUICK)
    assert again.whole_graph.cached and again.forms == plan.forms
