"""The train-form ODConv2d is checkpoint- and numerics-compatible with the reference layer."""

import pytest
import torch

from odconv_deploy import InputShapeError, ODConv2d, UnsupportedLayerError
from tests.helpers import randomize_odconv
from tests.reference_layer import PastedODConv2d

GEOMETRIES = [
    (8, 12, 3, 1, 1, 1, 1, 4), (8, 8, 3, 2, 1, 1, 8, 4), (8, 16, 1, 1, 0, 1, 1, 1),
    (6, 9, 5, 2, 2, 2, 3, 2), (16, 32, 1, 2, 0, 1, 1, 4), (7, 7, 3, 1, 1, 1, 7, 1),
]


@pytest.mark.parametrize("cfg", GEOMETRIES)
@pytest.mark.parametrize("train", [False, True])
def test_reference_state_dict_loads_strict_and_matches(cfg, train):
    cin, cout, k, s, p, d, g, kn = cfg
    ref = randomize_odconv(PastedODConv2d(cin, cout, k, s, p, d, g, kernel_num=kn).double())
    ours = ODConv2d(cin, cout, k, s, p, d, g, kernel_num=kn).double()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.update_temperature(ref.attention.temperature)
    ref.train(train)
    ours.train(train)
    x = torch.randn(3, cin, 11, 10, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_heads_dropped_like_reference():
    assert ODConv2d(8, 8, 3, groups=8).attention.filter_fc is None  # depthwise
    assert ODConv2d(8, 16, 3, groups=8).attention.filter_fc is not None
    assert ODConv2d(8, 8, 1).attention.spatial_fc is None
    assert ODConv2d(8, 8, 3, kernel_num=1).attention.kernel_fc is None
    assert ODConv2d(64, 8, 3).attention.fc.out_channels == 16  # min_channel
    assert ODConv2d(512, 8, 3).attention.fc.out_channels == 32  # 512 * 0.0625


def test_temperature_changes_output():
    layer = randomize_odconv(ODConv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 8, 6, 6)
    a = layer(x)
    layer.update_temperature(30.0)
    assert not torch.allclose(a, layer(x))


@pytest.mark.parametrize("kwargs, match", [
    ({"kernel_size": (3, 5)}, "not square"),
    ({"kernel_size": 3, "stride": (1, 2)}, "not square"),
    ({"kernel_size": 3, "padding_mode": "reflect"}, "padding_mode='reflect'"),
    ({"kernel_size": 3, "padding": "same"}, "padding='same'"),
    ({"kernel_size": 3, "groups": 3}, "must divide"),
    ({"kernel_size": 0}, "kernel_size=0"),
])
def test_bad_construction_is_clear(kwargs, match):
    with pytest.raises(UnsupportedLayerError, match=match):
        ODConv2d(8, 8, **kwargs)


def test_wrong_channels_at_run_time_names_layer():
    layer = ODConv2d(8, 8, 3)
    layer.layer_name = "backbone.conv7"
    with pytest.raises(InputShapeError, match=r"backbone.conv7: received 5 input channels.*"
                                              r"expected 8"):
        layer(torch.randn(1, 5, 8, 8))
    with pytest.raises(InputShapeError, match="rank 3"):
        layer(torch.randn(8, 8, 8))
    with pytest.raises(InputShapeError, match="dtype torch.int64; expected torch.float32"):
        layer(torch.ones(1, 8, 8, 8, dtype=torch.int64))
