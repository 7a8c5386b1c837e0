"""The model zoo: published parameter counts, I/O specs, whole-model conversion."""

import pytest
import torch

from odconv_deploy import (
    DEPLOY_STRATEGIES,
    UnknownModelError,
    convert_model,
    create_model,
    list_models,
    measure_complexity,
    model_entry,
)
from odconv_deploy.synthetic import synthesize_weights

# Published by the ODConv authors (millions, two decimals): static, ODConv 1x, ODConv 4x.
PUBLISHED_PARAMS = {
    "resnet18": 11.69, ("od_resnet18", 1): 11.94, ("od_resnet18", 4): 44.90,
    "resnet50": 25.56, ("od_resnet50", 1): 28.64, ("od_resnet50", 4): 90.67,
    "mobilenetv2_100": 3.50, ("od_mobilenetv2_100", 1): 4.94, ("od_mobilenetv2_100", 4): 11.51,
    "mobilenetv2_075": 2.64, ("od_mobilenetv2_075", 1): 3.51, ("od_mobilenetv2_075", 4): 7.50,
    "mobilenetv2_050": 1.97, ("od_mobilenetv2_050", 1): 2.43, ("od_mobilenetv2_050", 4): 4.44,
}


@pytest.mark.parametrize("key", list(PUBLISHED_PARAMS), ids=str)
def test_parameter_count_matches_published(key):
    name, kwargs = (key, {}) if isinstance(key, str) else (key[0], {"kernel_num": key[1]})
    model = create_model(name, **kwargs)
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 2) == PUBLISHED_PARAMS[key]


def test_published_macs_of_static_models():
    assert round(measure_complexity(create_model("resnet18")).macs / 1e9, 3) == 1.814
    assert round(measure_complexity(create_model("mobilenetv2_100")).macs / 1e6, 1) == 300.8


def test_every_odconv_model_has_a_static_twin():
    for name in list_models(odconv_only=True):
        twin = model_entry(name).static_twin
        assert twin in list_models() and not model_entry(twin).is_odconv


def test_synthetic_weights_are_the_same_in_every_process():
    """Every parameter, not only the conv weights: a second process must rebuild the same model
    (``odconv-deploy validate --onnx`` compares a file exported earlier against a fresh load)."""
    torch.manual_seed(1)
    a = synthesize_weights(create_model("od_tinynet", kernel_num=4), seed=0).state_dict()
    torch.manual_seed(2)  # a different global RNG state, as in another process
    b = synthesize_weights(create_model("od_tinynet", kernel_num=4), seed=0).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownModelError, match="od_mobilenetv2_100.*od_resnet18"):
        create_model("od_resnet19")


def test_unknown_kwarg_is_clear():
    with pytest.raises(TypeError, match="kernel_num"):
        create_model("resnet18", kernel_num=4)


@pytest.mark.parametrize("name", list_models())
def test_io_spec_matches_output(name):
    model = create_model(name, num_classes=10).eval()
    spec = model.io_spec
    (x,) = spec.sample_inputs(batch=2)
    assert x.shape == (2,) + spec.inputs[0].shape[1:]
    with torch.no_grad():
        y = model(x[:, :, :64, :64])
    assert y.shape == spec.outputs[0].with_batch(2)


@pytest.mark.parametrize("name", list_models(odconv_only=True))
@pytest.mark.parametrize("kernel_num", [1, 4])
def test_whole_zoo_deploy_matches_float32(name, kernel_num):
    if name in ("od_resnet101", "od_resnet50") and kernel_num == 4:
        strategies = ["im2col"]  # the other strategies are covered on the smaller models
    else:
        strategies = sorted(DEPLOY_STRATEGIES)
    model = synthesize_weights(create_model(name, kernel_num=kernel_num), seed=3)
    for strategy in strategies:
        deploy = convert_model(model, strategy=strategy).model
        for batch in (1, 3):
            (x,) = model.io_spec.with_input_size(96, 80).sample_inputs(batch, seed=batch)
            with torch.no_grad():
                ref, got = model(x), deploy(x)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
