"""NCHWc chains: maps stay blocked between ort_nchwc layers, and ONNX Runtime still matches.

The chain pass (:func:`export.nchwc_chains.keep_blocked_between_convs`) decides per op whether
it may read a blocked map; a wrong decision gives wrong numbers, not an error, so every graph
here is run in ONNX Runtime against PyTorch, with ops that must keep the NCHW map beside ops
that may not.
"""

import onnx
import pytest
import torch
from torch import nn

from export import export_onnx
from odconv_deploy import ODConv2d
from odconv_deploy.layers.ort_nchwc import NCHWC_DOMAIN, ort_nchwc_block, span_tile
from odconv_deploy.runners import OnnxRuntimeRunner
from tests.helpers import randomize_odconv
from tests.test_export import _assert_matches

BLOCK = ort_nchwc_block()
pytestmark = pytest.mark.skipif(BLOCK is None, reason="this onnxruntime has no NCHWc kernels")


def _conv_bn(conv: nn.Module, channels: int, act: nn.Module | None) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), *([act] if act else []))


class InvertedResidualNet(nn.Module):
    """An inverted residual, a static conv, a spatial gate, a grouped conv, then ODConv again.

    The spatial gate (a ``[N, 1, H, W]`` factor from a mean over channels) and the grouped
    conv cannot read a blocked map; everything else in the chain can.
    """

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand = _conv_bn(ODConv2d(c, 2 * c, 1, kernel_num=4), 2 * c, nn.ReLU6())
        self.dw = _conv_bn(ODConv2d(2 * c, 2 * c, 3, 1, 1, groups=2 * c, kernel_num=4), 2 * c,
                           nn.ReLU6())
        self.project = _conv_bn(ODConv2d(2 * c, c, 1, kernel_num=4), c, None)
        self.static = nn.Conv2d(c, c, 3, 2, 1)
        self.grouped = nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.tail = _conv_bn(ODConv2d(c, 2 * c, 3, 1, 1, kernel_num=2), 2 * c, nn.ReLU())
        self.fc = nn.Linear(2 * c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        x = torch.relu(self.static(x))
        x = x * torch.sigmoid(x.mean(dim=1, keepdim=True))  # needs the NCHW map
        x = self.tail(self.grouped(x) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_odconv(InvertedResidualNet(), seed=3).eval()


def _ops(proto: object, op_type: str, domain: str = NCHWC_DOMAIN) -> list[object]:
    return [n for n in proto.graph.node if n.op_type == op_type and n.domain == domain]


@pytest.mark.parametrize("batch", [1, 2])
def test_the_chain_stays_blocked_and_matches(net, tmp_path, batch):
    result = export_onnx(net, tmp_path / "chain.onnx", strategy="auto", target="onnxruntime",
                         dynamic_batch=False, batch_size=batch, input_shape=(batch, 3, 24, 24))
    assert result.options["layer_forms"] == {"ort_nchwc": 4}
    proto = onnx.load(str(result.path))
    producers = {out: n for n in proto.graph.node for out in n.output}
    readers = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    # Back to NCHW once: the spatial gate's mean over channels and its Mul need it.
    back = [sorted(readers[n.output[0]]) for n in _ops(proto, "ReorderOutput")]
    assert back == [["Mul", "ReduceMean"]]
    # Reordered in: the graph's one guard probe, and where a chain starts from an NCHW map:
    # the gated residual. At batch 1 the stem, a static conv on 3 channels, is an NCHWc conv
    # reading the image itself; at batch 2 its output is sliced per sample first and stays
    # NCHW, so each sample's slice of it and of the residual is reordered in, and the stem's
    # whole map once more for the residual Add.
    reordered = sorted(producers[n.input[0]].op_type for n in _ops(proto, "ReorderInput"))
    assert reordered == (["Add", "Slice"] if batch == 1 else ["Conv"] + ["Slice"] * 5)
    # The static stride-2 conv became an NCHWc conv (and at batch 1 the stem); the means of
    # blocked maps are NCHWc pools: the head's and the attentions' of expand (batch 1 only),
    # dw and project (tail's reads the gated, NCHW residual).
    assert len(_ops(proto, "Conv")) == 4 * batch + 1 + (batch == 1)
    assert len(_ops(proto, "GlobalAveragePool")) == (4 if batch == 1 else 3)
    x = torch.randn(batch, 3, 24, 24)
    with OnnxRuntimeRunner(result.path) as runner, torch.no_grad():
        (got,) = runner.infer({result.input_names[0]: x.numpy()}).values()
        _assert_matches(got, net(x), rtol=1e-5)


class PaddedNet(nn.Module):
    """An inverted residual on maps whose channels are off whole blocks (MobileNetV2's 24).

    ``c`` channels are padded to whole blocks when blocked; the residual sum, the next
    expand and its attention's mean read the padded map.
    """

    def __init__(self, c: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand = _conv_bn(ODConv2d(c, 2 * c, 1, kernel_num=4), 2 * c, nn.ReLU6())
        self.dw = _conv_bn(ODConv2d(2 * c, 2 * c, 3, 2, 1, groups=2 * c, kernel_num=4),
                           2 * c, nn.ReLU6())
        self.project = _conv_bn(ODConv2d(2 * c, c, 1, kernel_num=4), c, None)
        self.project2 = _conv_bn(ODConv2d(c, c, 1, kernel_num=2), c, None)
        self.head = _conv_bn(ODConv2d(c, 4 * c, 1, kernel_num=4), 4 * c, nn.ReLU6())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.project(self.dw(self.expand(self.stem(x))))
        x = x + self.project2(x)
        return nn.functional.adaptive_avg_pool2d(self.head(x), 1).flatten(1)


@pytest.mark.parametrize("batch", [1, 2])
def test_maps_with_padding_channels_stay_blocked_and_match(tmp_path, batch):
    c = BLOCK + BLOCK // 2  # e.g. 24 with AVX-512's block 16, padded to 32
    torch.manual_seed(0)
    net = randomize_odconv(PaddedNet(c), seed=4).eval()
    result = export_onnx(net, tmp_path / "padded.onnx", strategy="auto", target="onnxruntime",
                         dynamic_batch=False, batch_size=batch, input_shape=(batch, 3, 20, 20))
    assert result.options["layer_forms"] == {"ort_nchwc": 5}
    proto = onnx.load(str(result.path))
    # Nothing goes back to NCHW before the head's pool; the padded maps' means are cropped.
    assert not _ops(proto, "ReorderOutput")
    pools = _ops(proto, "GlobalAveragePool")
    assert len(pools) == 4 + 1  # the attentions after expand read blocked maps; the head
    crops = [n for n in proto.graph.node if n.op_type == "Slice" and n.input[0] in
             {p.output[0] for p in pools}]
    assert len(crops) == 2  # project2's and head's attentions read padded maps
    x = torch.randn(batch, 3, 20, 20)
    with OnnxRuntimeRunner(result.path) as runner, torch.no_grad():
        (got,) = runner.infer({result.input_names[0]: x.numpy()}).values()
        _assert_matches(got, net(x), rtol=1e-5)


def test_per_channel_factors_broadcast_in_long_spans():
    assert span_tile(49, 16) == 7 and span_tile(196, 16) == 14 and span_tile(3136, 16) == 16
    assert span_tile(13, 8) == 13 and span_tile(17, 16) == 1  # 17 blocks: no divisor fits


def test_a_bias_shared_through_identity_is_still_padded(tmp_path):
    """A padded conv's bias that the exporter feeds through an Identity is still padded.

    The exporter stores equal constants once and feeds the other uses through Identity
    nodes: here the folded biases of two padded 1x1 layers with the same BatchNorm.
    """
    c = BLOCK + BLOCK // 2
    torch.manual_seed(0)
    net = randomize_odconv(PaddedNet(c), seed=4).eval()
    net.project2[1].load_state_dict(net.project[1].state_dict())
    result = export_onnx(net, tmp_path / "shared.onnx", strategy="auto", target="onnxruntime",
                         dynamic_batch=False, input_shape=(1, 3, 20, 20))
    assert result.details["nchwc_convs"] == 5
    proto = onnx.load(str(result.path))
    assert any(n.op_type == "Identity" for n in proto.graph.node)  # the case is exercised
    x = torch.randn(1, 3, 20, 20)
    with OnnxRuntimeRunner(result.path) as runner, torch.no_grad():
        (got,) = runner.infer({result.input_names[0]: x.numpy()}).values()
        _assert_matches(got, net(x), rtol=1e-5)
