"""The conversion walker: foreign classes, BN folding, idempotence, copies, verification."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from odconv_deploy import (
    ConversionError,
    Im2colODConv2d,
    ODConv2d,
    ODConv2dDeploy,
    StaticWeightODConv2d,
    UnsupportedLayerError,
    convert_model,
    create_model,
    reparameterize_model,
)
from tests.helpers import randomize_odconv
from tests.reference_layer import PastedODConv2d


class YoloishBlock(nn.Module):
    """A user detector block: pasted ODConv + BN + SiLU, a shortcut, a static conv."""

    def __init__(self, c):
        super().__init__()
        self.cv1 = PastedODConv2d(c, c, 3, 1, 1, kernel_num=4)
        self.bn1 = nn.BatchNorm2d(c)
        self.act = nn.SiLU()
        self.cv2 = PastedODConv2d(c, 2 * c, 1, 2, 0, kernel_num=1)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.head = nn.Conv2d(2 * c, 5, 1)

    def forward(self, x):
        y = self.act(self.bn1(self.cv1(x))) + x
        return self.head(self.act(self.bn2(self.cv2(y))))


class Untraceable(nn.Module):
    """Top-level control flow on tensor values defeats torch.fx; children still trace."""

    def __init__(self):
        super().__init__()
        self.block = YoloishBlock(8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch
            return self.block(x)
        return self.block(-x)


def _check(model, converted, shape, rtol=1e-10):
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        ref, got = model(x), converted(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=rtol * ref.abs().max().item())


def test_foreign_class_converted_with_bn_folded():
    model = randomize_odconv(YoloishBlock(8).double()).eval()
    result = convert_model(model)
    assert [layer.name for layer in result.layers] == ["cv1", "cv2"]
    assert [layer.folded_bn for layer in result.layers] == ["bn1", "bn2"]
    assert isinstance(result.model.cv1, Im2colODConv2d)
    assert isinstance(result.model.bn1, nn.Identity)
    _check(model, result.model, (2, 8, 12, 10))


def test_untraceable_top_level_still_folds_inside_children():
    model = randomize_odconv(Untraceable().double()).eval()
    result = convert_model(model)
    assert result.folded_bn_count == 2
    _check(model, result.model, (2, 8, 9, 9))


def test_bn_not_folded_when_output_has_other_users():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.od = ODConv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.od(x)
            return self.bn(y) + y  # the raw conv output is used too

    model = randomize_odconv(Branchy().double()).eval()
    result = convert_model(model)
    assert result.folded_bn_count == 0
    _check(model, result.model, (2, 4, 7, 7))


def test_fold_bn_off_keeps_batchnorm():
    model = randomize_odconv(YoloishBlock(8).double()).eval()
    result = convert_model(model, fold_bn=False)
    assert isinstance(result.model.bn1, nn.BatchNorm2d) and result.folded_bn_count == 0
    _check(model, result.model, (1, 8, 8, 8))


def test_input_untouched_converting_twice_is_noop_and_inplace():
    model = randomize_odconv(create_model("od_mobilenetv2_050", kernel_num=4,
                                          num_classes=10)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    once = reparameterize_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, ODConv2dDeploy) for m in model.modules())
    twice = reparameterize_model(once)
    assert {k: v.shape for k, v in twice.state_dict().items()} == \
        {k: v.shape for k, v in once.state_dict().items()}
    assert all(torch.equal(once.state_dict()[k], v) for k, v in twice.state_dict().items())
    same = reparameterize_model(model, inplace=True)
    assert same is model and any(isinstance(m, ODConv2dDeploy) for m in model.modules())


def test_single_layer_model():
    layer = randomize_odconv(ODConv2d(6, 6, 3, padding=1, groups=6).double()).eval()
    deploy = reparameterize_model(layer, strategy="static_weight")
    assert isinstance(deploy, StaticWeightODConv2d)
    _check(layer, deploy, (3, 6, 8, 8))


def test_converted_checkpoint_loads_into_directly_built_deploy_form():
    layer = randomize_odconv(ODConv2d(8, 12, 3, 2, 1, kernel_num=4)).eval()
    deploy = reparameterize_model(layer)
    built = Im2colODConv2d(8, 12, 3, stride=2, padding=1, kernel_num=4, attention_channels=16)
    built.load_state_dict(deploy.state_dict(), strict=True)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(built(x), layer(x), rtol=1e-5, atol=1e-5)


def test_layer_with_reference_structure_but_other_forward_is_rejected():
    class Tampered(PastedODConv2d):
        def forward(self, x):
            return F.relu(super().forward(x))  # not ODConv any more

    model = nn.Sequential(randomize_odconv(Tampered(4, 4, 3, padding=1)))
    with pytest.raises(ConversionError, match=r"0: deploy form \(im2col\) differs"):
        convert_model(model)


def test_unknown_strategy_and_unsupported_geometry():
    with pytest.raises(UnsupportedLayerError, match="Unknown deploy strategy 'fast'"):
        convert_model(ODConv2d(4, 4, 3), strategy="fast")
    layer = PastedODConv2d(4, 4, 3)
    layer.padding = "same"
    with pytest.raises(UnsupportedLayerError, match="padding='same'"):
        convert_model(nn.Sequential(layer))
