"""Routing agreement: every ODConv layer's attentions and output, per runtime, against PyTorch.

The probes must hold the attentions the train form computes (an independent reference: the
reference layer's own attention module), leave the probed model untouched, agree on every
runtime for a correct artifact, and name the first diverging layer of a broken one, also
where output-only validation passes.
"""

import copy

import numpy as np
import pytest
import torch

from export import export_formats
from export.validation import ROUTING_FORMATS, candidates_for, routing_agreement
from odconv_deploy import create_model
from odconv_deploy.conversions import Conversions
from odconv_deploy.io_spec import IOSpec, TensorSpec
from odconv_deploy.layers import ODConv2dDeploy
from odconv_deploy.reparameterize import convert_model
from odconv_deploy.synthetic import synthesize_weights
from odconv_deploy.validation.probes import ProbedModel
from odconv_deploy.validation.routing import check_routing
from tests.helpers import randomize_odconv
from tests.test_export import UserNet

pytest.importorskip("onnxruntime")
USER_SPEC = IOSpec((TensorSpec("input", (1, 3, 32, 32)),), (TensorSpec("output", ()),),
                   mean=None, std=None, task="generic")


def _user_net():
    return randomize_odconv(UserNet(), seed=1).eval()


def test_probes_are_the_train_forms_attentions_in_float64():
    net = _user_net().double()
    result = convert_model(net)
    deploy = result.model
    spec = IOSpec((TensorSpec("input", (1, 3, 32, 32), torch.float64),), (
        TensorSpec("output", ()),), mean=None, std=None, task="generic")
    # a deploy layer's output includes the BatchNorm folded into it (bn1 into od1)
    folded = {c.name: c.folded_bn for c in result.layers}
    assert folded == {"od1": "bn1", "od2": None}
    probed = ProbedModel(deploy, spec)
    assert probed.layer_names == ["od1", "od2"]  # execution order
    assert [p.kind for p in probed.probes if p.layer == "od2"] == [
        "kernel", "spatial", "channel", "output"]  # depthwise: no filter attention
    seen = {}
    for name in ("od1", "od2"):
        layer = getattr(net, name)
        layer.attention.register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, out))
        (net.get_submodule(folded[name]) if folded[name] else layer).register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name + ".out", out))
    (x,) = spec.sample_inputs(3, seed=3)
    with torch.no_grad():
        net(x)
        values = dict(zip(probed.io_spec.output_names, probed(x), strict=True))
    order = ("channel", "filter", "spatial", "kernel")  # the reference layer's return order
    for p in probed.probes:
        ref = (seen[p.layer + ".out"] if p.kind == "output"
               else seen[p.layer][order.index(p.kind)])
        got = values[p.name]
        assert got.shape[0] == 3
        torch.testing.assert_close(got, ref.reshape(got.shape), rtol=1e-10, atol=1e-12)


def test_probing_leaves_the_model_as_it_was():
    deploy = convert_model(_user_net()).model
    before = {k: v.clone() for k, v in deploy.state_dict().items()}
    ProbedModel(deploy, USER_SPEC)
    for layer in deploy.modules():
        if isinstance(layer, ODConv2dDeploy):
            assert not layer._forward_hooks and "attentions" not in vars(layer)
    assert all(torch.equal(before[k], v) for k, v in deploy.state_dict().items())


def test_a_model_without_deploy_layers_is_refused():
    with pytest.raises(ValueError, match="no deploy-form ODConv layer"):
        ProbedModel(torch.nn.Conv2d(3, 4, 3), USER_SPEC)


def test_correct_artifacts_agree_in_every_layer_on_every_runtime(tmp_path):
    net = _user_net()
    report = routing_agreement(Conversions(net, "auto"), USER_SPEC, tmp_path)
    runners = {run.runner for run in report.runs}
    assert {"onnxruntime onnx (opt off)", "onnxruntime onnx (opt full)",
            "executorch (xnnpack)"} <= runners
    assert any(r.startswith("coreml") for r in runners)
    assert report.passed, report.to_markdown()
    for run in report.runs:
        assert [layer.layer for layer in run.layers] == ["od1", "od2"]
        assert all(layer.kernel_agreement == 1.0 for layer in run.layers)
    table = report.to_markdown()
    assert "| od2 |" in table and "FAIL" not in table
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "UserNet_probes.mlpackage", "UserNet_probes.onnx", "UserNet_probes.pte"]


def _break_layer(deploy, name, factor=1.5):
    broken = copy.deepcopy(deploy)
    with torch.no_grad():
        broken.get_submodule(name).weight.mul_(factor)
    return broken


def _broken_report(deploy, spec, broken, tmp_path, formats=ROUTING_FORMATS):
    """Artifacts exported from ``broken``, checked against ``deploy``'s probes."""
    reference = ProbedModel(deploy, spec)
    results = export_formats(ProbedModel(broken, spec), tmp_path, list(formats),
                             stem="broken", io_spec=reference.io_spec)
    assert all(r.ok for r in results), [r.error for r in results]
    return check_routing(reference, candidates_for(results))


@pytest.mark.slow
def test_a_layer_broken_deep_in_od_resnet18_is_the_first_diverging_on_every_runtime(tmp_path):
    model = synthesize_weights(create_model("od_resnet18", kernel_num=2), seed=2)
    spec = model.io_spec.with_input_size(64, 64)
    deploy = convert_model(model).model
    report = _broken_report(deploy, spec, _break_layer(deploy, "layer4.0.conv1"), tmp_path)
    assert len(report.runs) >= 4 and not report.passed
    for run in report.runs:
        first = run.first_diverging
        assert first is not None and first.layer == "layer4.0.conv1", run.runner
        assert first.index == 12 and not first.probes["output"]
        assert all(layer.passed for layer in run.layers[:first.index])  # before it: agree
    assert r"FAILED at layer 12 layer4.0.conv1 (output: max\|err\|" in report.to_markdown()


def test_a_layer_broken_in_a_pasted_layer_network_is_named_on_every_runtime(tmp_path):
    deploy = convert_model(_user_net()).model
    report = _broken_report(deploy, USER_SPEC, _break_layer(deploy, "od2", 1.2), tmp_path)
    assert len(report.runs) >= 4
    assert {run.first_diverging.layer for run in report.runs} == {"od2"}


def test_a_five_percent_attention_head_change_passes_outputs_but_not_routing(tmp_path):
    """Scaling one deep layer's attention heads by 1.05 hides under output tolerance."""
    from export.validation import validate_artifacts

    model = synthesize_weights(create_model("od_mobilenetv2_050", kernel_num=4), seed=0)
    spec = model.io_spec.with_input_size(96, 96)
    deploy = convert_model(model).model
    name = "features.16.conv.1.0"  # the last inverted residual's depthwise layer
    broken = copy.deepcopy(deploy)
    with torch.no_grad():
        broken.get_submodule(name).attention_heads.weight.mul_(1.05)
    results = export_formats(broken, tmp_path / "shipped", ["onnx"], stem="m", io_spec=spec)
    outputs = validate_artifacts(model, results, io_spec=spec, batches=(3,))
    assert outputs.passed, outputs.to_markdown()  # the logits barely move
    report = _broken_report(deploy, spec, broken, tmp_path / "probes", formats=["onnx"])
    for run in report.runs:
        assert run.first_diverging.layer == name
        assert not run.first_diverging.probes["kernel"]
    assert np.isfinite([layer.probes["output"].max_abs for layer in report.runs[0].layers]).all()
