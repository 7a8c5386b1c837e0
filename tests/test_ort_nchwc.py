"""ort_nchwc: exact in float64, run on ORT's NCHWc ops, refused on a CPU with another block."""

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export import ExportError, export_executorch, export_formats, export_onnx
from export.nchwc_graph import count_unblocked_convs
from odconv_deploy import (
    AutoStrategy,
    DynamicWeightODConv2d,
    ODConv2d,
    OrtNchwcODConv2d,
    UnsupportedLayerError,
    convert_model,
    inspect_odconv,
)
from odconv_deploy.layers.ort_nchwc import (
    BLOCK_METADATA_KEY,
    NCHWC_DOMAIN,
    block_weight,
    ort_nchwc_block,
    unblock_weight,
)
from odconv_deploy.runners import OnnxRuntimeRunner, RunnerError
from tests.helpers import randomize_odconv
from tests.test_export import _assert_matches

BLOCK = ort_nchwc_block()
needs_nchwc = pytest.mark.skipif(BLOCK is None, reason="this onnxruntime has no NCHWc kernels")

#: (cin, cout, k, stride, pad, dilation, groups, kernel_num, block): every eligible kind.
GEOMETRIES = [
    (8, 16, 3, 1, 1, 1, 1, 4, 8),  # regular, filter head
    (16, 8, 3, 2, 0, 1, 1, 1, 8),  # K=1 (no kernel head), stride 2, no padding
    (8, 8, 3, 1, 1, 1, 8, 4, 8),  # depthwise
    (16, 16, 5, 2, 4, 2, 16, 2, 16),  # depthwise, stride + dilation, block 16 (AVX-512)
    (4, 12, 7, 1, 3, 1, 1, 8, 4),  # 7x7, block 4
    (32, 32, 3, 1, 2, 2, 1, 4, 16),  # dilated regular, block 16
    (16, 32, 1, 1, 0, 1, 1, 4, 8),  # 1x1: channel and filter attention on the weight
    (160, 16, 1, 1, 0, 1, 1, 2, 16),  # 1x1, C_in above the 154 pixels of batch 1: filter on output
    (16, 160, 1, 2, 0, 1, 1, 2, 16),  # 1x1 stride 2, C_out above the pixels: channel on input
    (24, 40, 1, 1, 0, 1, 1, 4, 16),  # channels off whole blocks: padded to 32 -> 48
    (12, 8, 3, 1, 1, 1, 1, 2, 8),  # padded 3x3 with a filter head (on the weight then)
]
GEOMETRY_ID = "c{}-{}_k{}_s{}_p{}_d{}_g{}_K{}_b{}".format


def _block(cin, cout, k, s, p, d, g, kn, seed=0, dtype=torch.float64):
    layer = ODConv2d(cin, cout, k, s, p, d, g, kernel_num=kn).to(dtype)
    block = nn.Sequential(layer, nn.BatchNorm2d(cout).to(dtype))
    return randomize_odconv(block, seed=seed, temperature=2.3).eval()


@pytest.mark.parametrize("cfg", GEOMETRIES, ids=lambda c: GEOMETRY_ID(*c))
def test_form_is_exact_float64(cfg):
    cin, cout, k, s, p, d, g, kn, block_size = cfg
    block = _block(*cfg[:8], seed=sum(cfg))
    deploy = OrtNchwcODConv2d.from_spec(inspect_odconv(block[0]), block[1], block=block_size)
    deploy = deploy.eval()
    assert deploy.block == block_size and "block=" in repr(deploy)
    for batch in (1, 2, 3):
        x = torch.randn(batch, cin, 13 + batch, 11, dtype=torch.float64)
        with torch.no_grad():
            expected, actual = block(x), deploy(x)
        torch.testing.assert_close(actual, expected, rtol=0,
                                   atol=1e-10 * expected.abs().max().item())


def test_a_wrong_attention_is_caught():
    torch.manual_seed(0)  # the layer's initial weights come from the global generator
    block = _block(8, 16, 3, 1, 1, 1, 1, 4)
    deploy = OrtNchwcODConv2d.from_spec(inspect_odconv(block[0]), block[1], block=8).eval()
    with torch.no_grad():
        deploy.attention_heads.bias[:8] += 1e-6  # the channel-attention logits
        x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
        assert (deploy(x) - block(x)).abs().max() > 1e-10 * block(x).abs().max()


@pytest.mark.parametrize("depthwise", [False, True])
def test_block_layout_round_trips(depthwise):
    weight = torch.randn(3, 16, 1 if depthwise else 24, 3, 3)
    blocked = block_weight(weight, 8, depthwise)
    assert blocked.shape[1:] == ((2, 3, 3, 8) if depthwise else (2, 3, 3, 3, 8, 8))
    for k in range(3):
        back = unblock_weight(blocked[k].reshape(-1), 16, weight.shape[2], 3, 8, depthwise)
        assert torch.equal(back, weight[k])


@pytest.mark.parametrize("cfg", [GEOMETRIES[0], GEOMETRIES[2], GEOMETRIES[-2], GEOMETRIES[-1]],
                         ids=lambda c: GEOMETRY_ID(*c))
def test_the_stored_bank_is_the_canonical_one(cfg):
    """Blocked (and padded) storage holds exactly the canonical bank, padding aside."""
    block = _block(*cfg[:8], seed=1)
    spec = inspect_odconv(block[0])
    nchwc = OrtNchwcODConv2d.from_spec(spec, block[1], block=cfg[8])
    plain = DynamicWeightODConv2d.from_spec(spec, block[1])
    assert nchwc.padded == (cfg[0] % cfg[8] != 0 or cfg[1] % cfg[8] != 0)
    assert torch.equal(nchwc.canonical_weight(), plain.canonical_weight())
    if nchwc.padded:  # the padding channels' filters hold zeros
        assert nchwc.weight.numel() > plain.weight.numel()
        assert torch.count_nonzero(nchwc.weight) == torch.count_nonzero(plain.weight)


@pytest.mark.parametrize("args,reason", [
    ((6, 16, 1, 1, 0, 1, 1), "channels 6 -> 16 are not multiples of 4"),
    ((16, 6, 3, 1, 1, 1, 1), "channels 16 -> 6 are not multiples of 4"),
    ((12, 12, 3, 1, 1, 1, 12), "depthwise channels 12 are not a multiple of the block 8"),
    ((16, 16, 3, 1, 1, 1, 2), "grouped convs \\(groups=2\\)"),
])
def test_layers_that_do_not_fit_are_refused(args, reason):
    cin, cout, k, s, p, d, g = args
    spec = inspect_odconv(ODConv2d(cin, cout, k, s, p, d, g, kernel_num=2))
    with pytest.raises(UnsupportedLayerError, match=f"cannot take the conv.*{reason}.*'auto'"):
        OrtNchwcODConv2d.from_spec(spec, block=8)


class Net(nn.Module):
    """Depthwise 3x3 + ReLU6 (fused into the NCHWc conv), 1x1 + ReLU (fused), regular 3x3."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = ODConv2d(16, 16, 3, 2, 1, groups=16, kernel_num=4)
        self.bn = nn.BatchNorm2d(16)
        self.pw = ODConv2d(16, 32, 1, kernel_num=4)
        self.conv = ODConv2d(32, 16, 3, 1, 1, kernel_num=2)

    def forward(self, x):
        x = nn.functional.relu6(self.bn(self.dw(self.stem(x))))
        return self.conv(torch.relu(self.pw(x)))


SHAPE = (1, 3, 20, 20)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return randomize_odconv(Net(), seed=5).eval()


def test_auto_uses_it_for_ort_with_a_fixed_batch_only(net):
    expected_dw = "ort_nchwc" if BLOCK is not None and 16 % BLOCK == 0 else "dynamic_weight"
    layers = {c.name: c.form for c in convert_model(
        net, strategy="auto", target="onnxruntime", dynamic_batch=False).layers}
    assert layers == {"dw": expected_dw, "pw": expected_dw, "conv": expected_dw}
    for target, dynamic in (("onnx", False), ("onnxruntime", True)):  # portable / any batch: never
        choice = AutoStrategy(target, dynamic).choose(inspect_odconv(net.dw))
        assert choice != "ort_nchwc"


@needs_nchwc
@pytest.mark.parametrize("batch", [1, 2])
def test_ort_runs_the_nchwc_graph_and_matches(net, tmp_path, batch):
    result = export_onnx(net, tmp_path / "n.onnx", strategy="auto", target="onnxruntime",
                         dynamic_batch=False, batch_size=batch, input_shape=SHAPE)
    assert result.options["layer_forms"] == {"ort_nchwc": 3}
    assert result.options["nchwc_block"] == BLOCK
    assert result.details["nchwc_convs"] == 3 * batch  # one conv per layer and sample
    proto = onnx.load(str(result.path))
    nchwc_ops = [n for n in proto.graph.node if n.domain == NCHWC_DOMAIN and n.op_type == "Conv"]
    # And at batch 1 the static stem on 3 channels, read blocked by the first layer.
    assert len(nchwc_ops) == 3 * batch + (batch == 1)
    assert count_unblocked_convs(proto, BLOCK) == 0
    activations = {a.s for n in nchwc_ops for a in n.attribute if a.name == "activation"}
    # Batch 1: the depthwise conv's ReLU6 and the 1x1's ReLU are fused (the 3x3's filter
    # attention scales its output first); batch 2: the samples' outputs are concatenated
    # first, so nothing is fused.
    assert activations == ({b"Clip", b"Relu"} if batch == 1 else set())
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[BLOCK_METADATA_KEY] == str(BLOCK)
    x = torch.randn(batch, *SHAPE[1:])
    with OnnxRuntimeRunner(result.path) as runner, torch.no_grad():
        (got,) = runner.infer({result.input_names[0]: x.numpy()}).values()
        _assert_matches(got, net(x), rtol=1e-5)


@needs_nchwc
def test_a_cpu_with_another_block_refuses_the_graph(net, tmp_path):
    """Laid out for the wrong block, the graph must fail in ORT, never return numbers."""
    other = 16 if BLOCK == 8 else 8
    model = net.__class__()
    model.load_state_dict(net.state_dict())
    model.eval()
    model.dw = OrtNchwcODConv2d.from_spec(inspect_odconv(net.dw), net.bn, block=other).eval()
    model.bn = nn.Identity()
    result = export_onnx(model, tmp_path / "foreign.onnx", dynamic_batch=False,
                         input_shape=SHAPE, strategy="im2col")
    assert result.details["nchwc_convs"] == 1
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)reshape"):
        session.run(None, {result.input_names[0]: torch.randn(SHAPE).numpy()})
    with pytest.raises(RunnerError, match=f"block {other}.*uses block {BLOCK}.*re-export"):
        OnnxRuntimeRunner(result.path).activate()


def test_other_targets_refuse_ort_nchwc_layers(net, tmp_path):
    model = net.__class__()
    model.load_state_dict(net.state_dict())
    model.eval()
    model.conv = OrtNchwcODConv2d.from_spec(inspect_odconv(net.conv), block=8).eval()
    pytest.importorskip("executorch")
    with pytest.raises(ExportError, match="only ONNX Runtime runs.*executorch cannot"):
        export_executorch(model, tmp_path / "x.pte", input_shape=SHAPE, strategy="im2col")
    with pytest.raises(ExportError, match="torchscript exporter only"):
        pytest.importorskip("onnxscript")
        export_onnx(model, tmp_path / "x.onnx", dynamic_batch=False, input_shape=SHAPE,
                    strategy="im2col", exporter="dynamo")
    assert not list(tmp_path.iterdir())


def test_unknown_onnx_target_is_refused(net, tmp_path):
    with pytest.raises(ExportError, match="Unknown ONNX target 'tensorrt'.*'onnx', 'onnxruntime'"):
        export_onnx(net, tmp_path / "x.onnx", target="tensorrt", input_shape=SHAPE)


@needs_nchwc
def test_dynamic_image_size_and_ort_format_keep_the_nchwc_convs(net, tmp_path):
    result = export_onnx(net, tmp_path / "dyn.onnx", strategy="auto", target="onnxruntime",
                         dynamic_batch=False, dynamic_spatial=True, input_shape=SHAPE)
    assert result.details["nchwc_convs"] == 3
    with OnnxRuntimeRunner(result.path) as runner, torch.no_grad():
        for size in (20, 33):  # the guard's shapes follow the input, so any size runs
            x = torch.randn(1, 3, size, size + 4)
            (got,) = runner.infer({result.input_names[0]: x.numpy()}).values()
            _assert_matches(got, net(x), rtol=1e-5)
    results = {r.format.value: r for r in export_formats(
        net, tmp_path / "fmt", ["ort"], strategy="auto", dynamic_batch=False,
        onnx_target="onnxruntime", input_shape=SHAPE)}
    assert all(r.ok for r in results.values()), {k: r.error for k, r in results.items()}
    assert results["onnx"].details["nchwc_convs"] == 3
    x = torch.randn(SHAPE)
    with OnnxRuntimeRunner(results["ort"].path) as runner, torch.no_grad():
        (got,) = runner.infer({results["ort"].input_names[0]: x.numpy()}).values()
        _assert_matches(got, net(x), rtol=1e-5)
