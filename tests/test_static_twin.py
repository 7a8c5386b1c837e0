"""derive_static_twin: any network's ODConv layers replaced by static convs of the same geometry."""

import pytest
import torch
from torch import nn

from odconv_deploy.detect import inspect_odconv
from odconv_deploy.layers import ODConv2d, ODConv2dDeploy
from odconv_deploy.models import create_model, model_entry
from odconv_deploy.reparameterize import convert_model, find_odconv_layers
from odconv_deploy.static_twin import derive_static_twin, static_conv_for
from odconv_deploy.synthetic import synthesize_weights
from tests.reference_layer import PastedODConv2d


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _no_odconv_left(model: nn.Module) -> None:
    assert find_odconv_layers(model) == []
    assert not any(isinstance(m, ODConv2dDeploy) for m in model.modules())


def _geometry(conv: nn.Conv2d) -> tuple:
    return (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
            conv.padding[0], conv.dilation[0], conv.groups)


def _spec_geometry(spec) -> tuple:
    return (spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, spec.padding,
            spec.dilation, spec.groups)


@pytest.fixture(scope="module")
def od_mobilenet() -> nn.Module:
    return synthesize_weights(create_model("od_mobilenetv2_050", kernel_num=1))


@pytest.mark.parametrize("name", ["od_resnet18", "od_mobilenetv2_050"])
def test_zoo_twin_matches_named_twin(name: str) -> None:
    model = create_model(name, kernel_num=1).eval()
    before = _state_copy(model)
    layers = find_odconv_layers(model)
    assert layers
    twin = derive_static_twin(model)
    named = create_model(model_entry(name).static_twin).eval()
    assert _params(twin) == _params(named)
    _no_odconv_left(twin)
    assert not twin.training
    # Every replaced layer kept its geometry (and has no bias).
    for layer_name, layer in layers:
        conv = twin.get_submodule(layer_name)
        assert type(conv) is nn.Conv2d and conv.bias is None
        assert _geometry(conv) == _spec_geometry(inspect_odconv(layer, layer_name))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert twin(x).shape == named(x).shape == model(x).shape
    _assert_state_equal(model, before)  # the input model is untouched
    assert find_odconv_layers(model)  # ... and still has its ODConv layers
    assert model.training is False


def test_pasted_reference_class() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Sequential(PastedODConv2d(16, 32, 3, stride=2, padding=1, kernel_num=4),
                      nn.BatchNorm2d(32), nn.SiLU()),
        PastedODConv2d(32, 32, 3, padding=2, dilation=2, groups=32, kernel_num=1),
        PastedODConv2d(32, 8, 1, kernel_num=2),
    ).eval()
    before = _state_copy(model)
    twin = derive_static_twin(model)
    _no_odconv_left(twin)
    assert _geometry(twin[1][0]) == (16, 32, 3, 2, 1, 1, 1)
    assert _geometry(twin[2]) == (32, 32, 3, 1, 2, 2, 32)
    assert _geometry(twin[3]) == (32, 8, 1, 1, 0, 1, 1)
    x = torch.randn(2, 3, 20, 18)
    with torch.no_grad():
        assert twin(x).shape == model(x).shape
    _assert_state_equal(model, before)


def test_converted_model(od_mobilenet: nn.Module) -> None:
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = od_mobilenet(x).shape
    converted = convert_model(od_mobilenet).model
    assert any(isinstance(m, ODConv2dDeploy) for m in converted.modules())
    before = _state_copy(converted)
    twin = derive_static_twin(converted)
    _no_odconv_left(twin)
    with torch.no_grad():
        assert twin(x).shape == expected
    _assert_state_equal(converted, before)
    # A deploy layer with a folded BatchNorm becomes a conv with a bias (the BN is gone).
    deploy = {n: m for n, m in converted.named_modules() if isinstance(m, ODConv2dDeploy)}
    for name, layer in deploy.items():
        conv = twin.get_submodule(name)
        assert (conv.bias is not None) == (layer.bias is not None)
        assert _geometry(conv) == (layer.in_channels, layer.out_channels, layer.kernel_size,
                                   layer.stride, layer.padding, layer.dilation, layer.groups)
    assert any(layer.bias is not None for layer in deploy.values())


def test_converted_without_bn_fold_matches_train_twin(od_mobilenet: nn.Module) -> None:
    converted = convert_model(od_mobilenet, fold_bn=False, verify=False).model
    assert _params(derive_static_twin(converted)) == _params(derive_static_twin(od_mobilenet))


@pytest.mark.parametrize("layer", [
    ODConv2d(8, 16, 3, stride=2, padding=1, kernel_num=4),
    PastedODConv2d(8, 8, 3, padding=1, groups=8, kernel_num=1),
])
def test_model_is_one_layer(layer: nn.Module) -> None:
    before = _state_copy(layer)
    twin = derive_static_twin(layer)
    assert type(twin) is nn.Conv2d and not twin.training
    assert _geometry(twin) == _spec_geometry(inspect_odconv(layer))
    x = torch.randn(2, 8, 11, 9)
    with torch.no_grad():
        assert twin(x).shape == layer.eval()(x).shape
    _assert_state_equal(layer, before)
    deploy = convert_model(layer).model
    assert isinstance(deploy, ODConv2dDeploy)
    assert _geometry(derive_static_twin(deploy)) == _geometry(twin)


def test_no_odconv_layer_gives_a_copy() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    before = _state_copy(model)
    twin = derive_static_twin(model)
    assert twin is not model and not twin.training and model.training
    assert [type(m) for m in twin] == [type(m) for m in model]
    _assert_state_equal(model, before)


def test_shared_layer_replaced_under_every_name() -> None:
    shared = PastedODConv2d(4, 4, 3, padding=1, kernel_num=2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model.again = shared
    twin = derive_static_twin(model)
    assert type(twin[0]) is nn.Conv2d
    assert twin[0] is twin[2] is twin.again
    _no_odconv_left(twin)


def test_seeded_and_deterministic() -> None:
    model = nn.Sequential(PastedODConv2d(3, 8, 3, padding=1, kernel_num=4), nn.BatchNorm2d(8))
    a, b = derive_static_twin(model, seed=3), derive_static_twin(model, seed=3)
    c = derive_static_twin(model, seed=4)
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), key
    assert not torch.equal(a[0].weight, c[0].weight)


def test_dtype_follows_the_layer() -> None:
    layer = ODConv2d(4, 6, 3, padding=1, kernel_num=2).double()
    assert static_conv_for(layer).weight.dtype == torch.float64
    twin = derive_static_twin(nn.Sequential(layer))
    assert twin[0].weight.dtype == torch.float64
