"""The YOLO-style stand-in detector: shapes, conversion (with BN folds), static twin, pickling."""

import io

import pytest
import torch

from odconv_deploy.io_spec import IOSpec, TensorSpec
from odconv_deploy.layers import ODConv2dDeploy
from odconv_deploy.reparameterize import convert_model, find_odconv_layers
from odconv_deploy.static_twin import derive_static_twin
from tests.detector_net import (
    INPUT_SHAPE,
    NUM_FOLDABLE_BN,
    NUM_ODCONV,
    OUTPUT_NAMES,
    build_detector,
    output_shapes,
)
from tests.reference_layer import PastedODConv2d


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return build_detector()


@pytest.fixture(scope="module")
def converted(net: torch.nn.Module):
    return convert_model(net)


def _inputs(batch: int) -> torch.Tensor:
    (x,) = IOSpec((TensorSpec("image", INPUT_SHAPE),), ()).sample_inputs(batch, seed=batch)
    return x


def _assert_close(actual, expected) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        scale = e.abs().max().item()
        assert scale > 1e-3  # non-trivial outputs
        assert (a - e).abs().max().item() <= 1e-4 * scale


def test_small_and_in_eval_mode(net: torch.nn.Module) -> None:
    assert sum(p.numel() for p in net.parameters()) < 400_000
    assert not net.training


@pytest.mark.parametrize("batch", [1, 2])
def test_output_shapes(net: torch.nn.Module, batch: int) -> None:
    with torch.no_grad():
        out = net(_inputs(batch))
    assert isinstance(out, tuple)
    assert [tuple(o.shape) for o in out] == list(output_shapes(batch))
    assert output_shapes(1) == ((1, 24, 32, 40), (1, 24, 16, 20), (1, 24, 8, 10))


def test_dict_variant_matches_tuple(net: torch.nn.Module) -> None:
    as_dict = build_detector(as_dict=True)
    x = _inputs(1)
    with torch.no_grad():
        d, t = as_dict(x), net(x)
    assert list(d) == list(OUTPUT_NAMES)
    for name, tensor in zip(OUTPUT_NAMES, t, strict=True):
        assert torch.equal(d[name], tensor)


def test_layer_inventory(net: torch.nn.Module) -> None:
    layers = find_odconv_layers(net)
    assert len(layers) == NUM_ODCONV
    assert all(type(m) is PastedODConv2d for _, m in layers)
    kinds = [(m.kernel_size, m.kernel_num, m.groups == m.in_planes == m.out_planes)
             for _, m in layers]
    assert (3, 4, True) in kinds  # depthwise
    assert any(k == 1 for k, _, _ in kinds)  # 1x1
    assert (3, 4, False) in kinds  # k3, K=4
    assert any(n == 1 for _, n, _ in kinds)  # K=1


def test_convert_folds_and_matches(net: torch.nn.Module, converted) -> None:
    assert len(converted.layers) == NUM_ODCONV
    assert converted.folded_bn_count == NUM_FOLDABLE_BN
    assert {layer.name for layer in converted.layers if layer.folded_bn is None} == {
        "head.h3.conv"}
    model = converted.model
    assert find_odconv_layers(model) == []
    assert sum(isinstance(m, ODConv2dDeploy) for m in model.modules()) == NUM_ODCONV
    for batch in (1, 3):
        x = _inputs(batch)
        with torch.no_grad():
            _assert_close(model(x), net(x))


def test_static_twin(net: torch.nn.Module, converted) -> None:
    x = _inputs(1)
    for source in (net, converted.model):
        twin = derive_static_twin(source)
        assert find_odconv_layers(twin) == []
        with torch.no_grad():
            assert [tuple(o.shape) for o in twin(x)] == list(output_shapes(1))


def test_deterministic_and_picklable(net: torch.nn.Module) -> None:
    again = build_detector()
    for (key, a), b in zip(net.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = _inputs(1)
    with torch.no_grad():
        for a, b in zip(loaded(x), net(x), strict=True):
            assert torch.equal(a, b)
