"""The deploy form is an algebraic identity: float64, tight tolerance, many geometries."""

import itertools
import random

import pytest
import torch
from torch import nn

from odconv_deploy import (
    DEPLOY_STRATEGIES,
    LAYER_FORMS,
    ODConv2d,
    UnsupportedLayerError,
    convert_model,
    inspect_odconv,
)
from tests.helpers import attention_spread, randomize_odconv

TOL = 1e-10  # relative to max |y|; float64 rounding is ~1e-15


def _configs():
    """Hand-picked corner cases plus a seeded sample of the full cartesian sweep."""
    picked = [
        # cin, cout, k, stride, pad, dil, groups, K
        (8, 12, 3, 1, 1, 1, 1, 4), (7, 5, 3, 2, 0, 1, 1, 2), (9, 9, 3, 1, 1, 1, 9, 4),
        (6, 6, 5, 2, 2, 1, 6, 1), (8, 16, 1, 1, 0, 1, 1, 1), (8, 16, 1, 2, 0, 1, 2, 4),
        (5, 11, 7, 1, 3, 1, 1, 8), (6, 9, 5, 2, 2, 2, 3, 2), (4, 8, 3, 1, 2, 2, 4, 4),
        (3, 7, 1, 1, 0, 1, 1, 8), (16, 16, 3, 2, 1, 1, 16, 8), (10, 4, 3, 1, 0, 2, 2, 1),
        (4, 12, 3, 1, 1, 1, 4, 2),  # groups == C_in but C_out != C_in: filter head kept
        (6, 6, 3, 3, 2, 2, 6, 4),  # depthwise, stride 3 + dilation: 9 phases
        (32, 160, 1, 2, 0, 1, 1, 1),  # no per-sample weight factor: one shared kernel
    ]
    rng = random.Random(2022)
    sweep = list(itertools.product([3, 5, 8], [4, 7, 8], [1, 3, 5, 7], [1, 2], ["zero", "half"],
                                   [1, 2], ["one", "two", "dw"], [1, 2, 4, 8]))
    for cin, cout, k, s, pad, d, g, kn in rng.sample(sweep, 40):
        groups = {"one": 1, "two": 2, "dw": cin}[g]
        if g == "dw":
            cout = cin
        if g == "two" and (cin % 2 or cout % 2):
            groups = 1
        picked.append((cin, cout, k, s, 0 if pad == "zero" else k // 2 * d, d, groups, kn))
    return picked


CONFIGS = _configs()


CONFIG_ID = "c{}-{}_k{}_s{}_p{}_d{}_g{}_K{}".format
#: Depthwise geometries of the sweep (in == groups == out), for the depthwise-only form.
DEPTHWISE_CONFIGS = [c for c in CONFIGS if c[0] == c[6] == c[1]]


@pytest.mark.parametrize("strategy", sorted(DEPLOY_STRATEGIES))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: CONFIG_ID(*c))
def test_layer_deploy_is_exact_float64(cfg, strategy):
    _check_exact_float64(cfg, strategy)


@pytest.mark.parametrize("cfg", DEPTHWISE_CONFIGS, ids=lambda c: CONFIG_ID(*c))
def test_depthwise_taps_is_exact_float64(cfg):
    _check_exact_float64(cfg, "depthwise_taps")


#: Regular stride-1 geometries of the sweep, for the form that takes only those.
STRIDE1_REGULAR_CONFIGS = [c for c in CONFIGS if c[6] == 1 and c[3] == 1]


@pytest.mark.parametrize("cfg", STRIDE1_REGULAR_CONFIGS, ids=lambda c: CONFIG_ID(*c))
def test_dynamic_linear_is_exact_float64(cfg):
    _check_exact_float64(cfg, "dynamic_linear")


def test_the_sweep_has_enough_depthwise_geometries():
    assert len(DEPTHWISE_CONFIGS) >= 10
    assert {c[2] for c in DEPTHWISE_CONFIGS} >= {3, 5}
    assert {c[3] for c in DEPTHWISE_CONFIGS} == {1, 2, 3}


def _check_exact_float64(cfg: tuple[int, ...], strategy: str) -> None:
    cin, cout, k, s, p, d, g, kn = cfg
    seed = hash(cfg) % 1000
    layer = ODConv2d(cin, cout, k, s, p, d, g, kernel_num=kn).double()
    block = nn.Sequential(layer, nn.BatchNorm2d(cout).double())
    randomize_odconv(block, seed=seed, temperature=2.3)
    block.eval()
    if strategy in LAYER_FORMS and strategy not in DEPLOY_STRATEGIES:  # a one-kind-of-layer form
        deploy = nn.Sequential(LAYER_FORMS[strategy].from_spec(inspect_odconv(layer), block[1]),
                               nn.Identity()).eval()
    else:
        deploy = convert_model(block, strategy=strategy).model
    assert isinstance(deploy[0], LAYER_FORMS[strategy])
    assert isinstance(deploy[1], nn.Identity), "the following BatchNorm must be folded"
    gen = torch.Generator().manual_seed(seed)
    for batch in (1, 2, 5):
        height, width = 9 + 2 * d * k // 2 + batch, 12 + d * k
        x = torch.randn(batch, cin, height, width, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            expected, actual = block(x), deploy(x)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=0, atol=TOL * expected.abs().max())


def test_randomisation_makes_attentions_non_trivial():
    layer = randomize_odconv(ODConv2d(8, 8, 3, padding=1, kernel_num=8).double(), seed=1)
    layer.eval()
    peak, spread = attention_spread(layer, torch.randn(4, 8, 9, 9, dtype=torch.float64))
    assert peak > 0.6, "softmax over kernels should be peaky"
    assert spread > 0.2, "sigmoids should sit far from 0.5"


@pytest.mark.parametrize("strategy", sorted(LAYER_FORMS))
def test_equivalence_check_can_fail(strategy):
    """A deliberately wrong deploy form must be caught by the same comparison."""
    cin = 8 if strategy == "ort_nchwc" else 6  # ort_nchwc: channels in whole blocks
    cout, groups = (6, 6) if strategy == "depthwise_taps" else (8, 1)
    block = nn.Sequential(ODConv2d(cin, cout, 3, padding=1, groups=groups, kernel_num=4),
                          nn.BatchNorm2d(cout))
    block = randomize_odconv(block.double()).eval()
    if strategy in ("ort_nchwc", "dynamic_linear"):  # forms no strategy name selects
        options = {"block": 4} if strategy == "ort_nchwc" else {}
        deploy = nn.Sequential(LAYER_FORMS[strategy].from_spec(inspect_odconv(block[0]),
                                                               block[1], **options),
                               nn.Identity()).eval()
    else:
        deploy = (convert_model(block, strategy="auto", target="executorch") if groups > 1
                  else convert_model(block, strategy=strategy)).model
    assert isinstance(deploy[0], LAYER_FORMS[strategy])
    with torch.no_grad():  # every head's bias: one logit alone can sit on a saturated sigmoid
        deploy[0].attention_heads.bias += 1e-6
    # a seeded input: the global RNG state depends on which tests ran before
    x = torch.randn(2, cin, 10, 10, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = block(x), deploy(x)
    assert (actual - expected).abs().max() > TOL * expected.abs().max()


def test_depthwise_taps_refuses_other_layers():
    layer = ODConv2d(6, 8, 3, padding=1, kernel_num=4).eval()
    with pytest.raises(UnsupportedLayerError, match="depthwise layers only.*in=6, out=8, groups=1"):
        LAYER_FORMS["depthwise_taps"].from_spec(inspect_odconv(layer))


@pytest.mark.parametrize("strategy", sorted(DEPLOY_STRATEGIES))
def test_float32_layer_matches(strategy):
    layer = randomize_odconv(ODConv2d(16, 24, 3, 2, 1, kernel_num=4)).eval()
    deploy = convert_model(layer, strategy=strategy).model
    x = torch.randn(3, 16, 15, 17)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), layer(x), rtol=1e-5, atol=1e-5)
