"""MIL reference executor: where Core ML's op semantics differ from PyTorch's.

Each known divergence is either modelled as Core ML computes it (and then the executor
disagrees with PyTorch, as a device would) or refused with the reason. The references are
independent of the executor's code: numbers Core ML produced on a device (quoted from
coremltools PR 2844), hand-computed windows, NumPy formulas, and weights decoded from the
compressed ops' stored fields.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

ct = pytest.importorskip("coremltools")

import coremltools.optimize.coreml as cto  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402

from odconv_deploy.runners.mil import MILExecutor, UnsupportedMILOpError  # noqa: E402
from tests.test_mil_executor import rel_err, run1  # noqa: E402


def convert(module, shape, *, target="iOS15", name="x", precision="fp32"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.eval(), torch.zeros(shape))
        return ct.convert(traced, inputs=[ct.TensorType(name=name, shape=shape)],
                          convert_to="mlprogram",
                          minimum_deployment_target=getattr(ct.target, target),
                          compute_precision=(ct.precision.FLOAT16 if precision == "fp16"
                                             else ct.precision.FLOAT32),
                          skip_model_load=True)


def run_model(mlmodel, x):
    (out,) = MILExecutor(mlmodel).run({"x": x}).values()
    return out


ARANGE_7X7 = np.arange(49, dtype=np.float32).reshape(1, 1, 7, 7)


# -- avg_pool: Core ML divides ceil_mode edge windows by the full kernel --------------------

# AvgPool2d(2, stride=3, ceil_mode=True) on arange(49).reshape(7, 7), as coremltools PR 2844
# reports them: Core ML on a device, and PyTorch.
COREML_PR2844 = [[4.0, 7.0, 4.75], [25.0, 28.0, 15.25], [21.25, 22.75, 12.0]]
TORCH_PR2844 = [[4.0, 7.0, 9.5], [25.0, 28.0, 30.5], [42.5, 45.5, 48.0]]


def test_avg_pool_ceil_mode_edge_windows_are_divided_by_the_full_kernel():
    mlmodel = convert(nn.AvgPool2d(2, stride=3, ceil_mode=True), (1, 1, 7, 7))
    out = run_model(mlmodel, ARANGE_7X7)
    np.testing.assert_array_equal(out[0, 0], COREML_PR2844)
    torch_out = F.avg_pool2d(torch.from_numpy(ARANGE_7X7), 2, 3, ceil_mode=True)[0, 0]
    np.testing.assert_array_equal(torch_out.numpy(), TORCH_PR2844)  # the divergence is real
    assert rel_err(out, torch_out.numpy()[None, None]) > 0.4  # so validation fails it


def test_avg_pool_1d_ceil_mode_as_core_ml():
    # AvgPool1d(2, 3, ceil_mode=True) on arange(7): PyTorch [0.5, 3.5, 6.0], Core ML 3.0 last.
    x = np.arange(7, dtype=np.float32).reshape(1, 1, 7)
    out = run_model(convert(nn.AvgPool1d(2, stride=3, ceil_mode=True), (1, 1, 7)), x)
    np.testing.assert_array_equal(out.reshape(-1), [0.5, 3.5, 3.0])


@pytest.mark.parametrize("exclude", [False, True])
def test_avg_pool_ceil_mode_with_padding(exclude):
    # 6 wide, kernel 3, stride 2, pad 1: 4 windows; the last covers x[5], the right pad and one
    # overhang element. Core ML divides it by 3 (full kernel) or by 1 (input elements only).
    x = np.array([[[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]]], dtype=np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return mb.avg_pool(x=x_in, kernel_sizes=[1, 3], strides=[1, 2], pad_type="custom",
                           pad=[0, 0, 1, 1], ceil_mode=True,
                           exclude_padding_from_average=exclude)

    windows = [[0.0, 1.0, 2.0], [2.0, 3.0, 4.0], [4.0, 5.0, 6.0], [6.0, 0.0, 0.0]]
    inside = [2, 3, 3, 1]
    expect = [sum(w) / (n if exclude else 3) for w, n in zip(windows, inside, strict=True)]
    np.testing.assert_allclose(run1(prog, x_in=x).reshape(-1), expect, rtol=1e-6)


def test_max_pool_ceil_mode_with_padding_matches_torch_sizes():
    # With explicit padding coremltools drops the last window as PyTorch does (5 -> 3).
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32)
    mlmodel = convert(nn.MaxPool2d(2, stride=2, padding=1, ceil_mode=True), x.shape)
    ref = F.max_pool2d(torch.from_numpy(x), 2, 2, 1, ceil_mode=True).numpy()
    np.testing.assert_array_equal(run_model(mlmodel, x), ref)


def test_pool_window_wholly_past_the_input_is_refused():
    # MaxPool2d(1, 3, ceil_mode=True) on 6x6: PyTorch 2x2; Core ML's shape rule keeps a third
    # window that starts past the input, whose value no document gives.
    mlmodel = convert(nn.MaxPool2d(1, stride=3, ceil_mode=True), (1, 1, 6, 6))
    ex = MILExecutor(mlmodel)
    declared = ex._function.outputs[0].shape
    assert tuple(declared[-2:]) == (3, 3)  # the size the converted program declares
    with pytest.raises(UnsupportedMILOpError, match="wholly past the input"):
        ex.check_supported()
    with pytest.raises(UnsupportedMILOpError, match="max_pool"):
        ex.run({"x": np.zeros((1, 1, 6, 6), np.float32)})


# -- layer_norm over non-last axes ------------------------------------------------------------

def numpy_layer_norm(x, axes, gamma, beta, eps=1e-5):
    x = x.astype(np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    shape = [x.shape[d] if d in axes else 1 for d in range(x.ndim)]
    return (x - mean) / np.sqrt(var + eps) * gamma.reshape(shape) + beta.reshape(shape)


@pytest.mark.parametrize("shape, axes", [
    ((2, 4, 4), (1,)),          # gamma (4,) would also broadcast, wrongly, over the last axis
    ((2, 3, 4, 5), (1, 2)),
    ((2, 3, 4, 5), (-1, 1)),    # unsorted, negative: gamma is x.shape[axes] in axis order
    ((3, 6), (1,)),
])
def test_layer_norm_gamma_follows_the_normalised_axes(shape, axes):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(np.float32)
    pos = tuple(sorted(a % len(shape) for a in axes))
    gamma = rng.standard_normal([shape[d] for d in pos]).astype(np.float32)
    beta = rng.standard_normal([shape[d] for d in pos]).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)])
    def prog(x_in):
        return mb.layer_norm(x=x_in, axes=list(axes), gamma=gamma, beta=beta, epsilon=1e-5)

    assert rel_err(run1(prog, x_in=x), numpy_layer_norm(x, pos, gamma, beta)) < 1e-6


# -- reshape with 0 (iOS17 matches zeros from the right) ----------------------------------

@pytest.mark.parametrize("x_shape, shape, expect", [
    ((2, 50), [1, 0, -1, 0], (1, 1, 2, 50)),  # the example of the iOS17 op definition
    ((6, 4), [2, 3, 0], (2, 3, 4)),           # the last 0 is the last input dim
    ((6, 4), [0, 3, 2, 0], (1, 3, 2, 4)),     # a 0 with no input dim at its place is 1
    ((6, 4), [0, 0], (6, 4)),                 # equal ranks: the dim at the same position
])
def test_ios17_reshape_zero_is_matched_from_the_right(x_shape, shape, expect):
    x = np.arange(np.prod(x_shape), dtype=np.float32).reshape(x_shape)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def prog(x_in):
        return mb.reshape(x=x_in, shape=shape)

    out = run1(prog, x_in=x)
    assert out.shape == expect
    np.testing.assert_array_equal(out.reshape(-1), x.reshape(-1))


# -- topk ----------------------------------------------------------------------------------

class TopK(nn.Module):
    def __init__(self, k, dim, largest):
        super().__init__()
        self.k, self.dim, self.largest = k, dim, largest

    def forward(self, x):
        values, indices = torch.topk(x, self.k, dim=self.dim, largest=self.largest)
        return values + indices.float()  # both outputs reach the result


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("k, dim, largest", [(3, 1, True), (2, -1, False), (1, 2, True)])
def test_topk_matches_torch(k, dim, largest, precision):
    # distinct integers: exact in fp16 too, so values and indices must match exactly
    x = np.random.default_rng(3).permutation(2 * 5 * 6).astype(np.float32).reshape(2, 5, 6)
    module = TopK(k, dim, largest)
    mlmodel = convert(module, x.shape, precision=precision)
    assert "topk" in MILExecutor(mlmodel).op_types
    np.testing.assert_array_equal(run_model(mlmodel, x), module(torch.from_numpy(x)).numpy())


def test_topk_ties_keep_the_lower_index_and_unsorted_is_refused():
    x = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]], dtype=np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS16)
    def prog(x_in):
        return mb.topk(x=x_in, k=2, axis=-1)

    values, indices = MILExecutor(prog).run({"x_in": x}).values()
    np.testing.assert_array_equal(values, [[3.0, 3.0]])
    np.testing.assert_array_equal(indices, [[1, 2]])

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS16)
    def unsorted(x_in):
        return mb.topk(x=x_in, k=2, axis=-1, sort=False)

    with pytest.raises(UnsupportedMILOpError, match="sort=False"):
        MILExecutor(unsorted).run({"x_in": x})


# -- constexpr ops: compressed weights (coremltools.optimize) --------------------------------

def compressible_net():
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


COMPRESSIONS = {
    "int8": (cto.linear_quantize_weights,
             cto.OpLinearQuantizerConfig(mode="linear_symmetric", weight_threshold=0)),
    "palette4": (cto.palettize_weights,
                 cto.OpPalettizerConfig(nbits=4, mode="kmeans", weight_threshold=0)),
    "prune50": (cto.prune_weights,
                cto.OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=0)),
}


def compress(net, name, target, precision="fp32"):
    fn, config = COMPRESSIONS[name]
    mlmodel = convert(net, (2, 3, 16, 16), target=target, precision=precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(mlmodel, cto.OptimizationConfig(global_config=config))


def decode_ios18(op):
    """The dense weight of an iOS18 constexpr op, from its stored fields (NumPy, by hand)."""
    val = {k: None if v.val is None else np.asarray(v.val) for k, v in op.inputs.items()}
    if op.op_type == "constexpr_blockwise_shift_scale":
        offset = 0 if val.get("offset") is None else val["offset"].astype(np.float32)
        return (val["data"].astype(np.float32) - offset) * val["scale"]
    if op.op_type == "constexpr_lut_to_dense":  # one palette for the tensor
        return val["lut"].reshape(-1)[val["indices"].astype(np.int64)]
    if op.op_type == "constexpr_sparse_to_dense":
        dense = np.zeros(val["mask"].shape, np.float32)
        dense[val["mask"].astype(bool)] = val["nonzero_data"]
        return dense
    raise AssertionError(op.op_type)


@pytest.mark.parametrize("name", sorted(COMPRESSIONS))
def test_compressed_weights_against_torch_with_the_decoded_weights(name):
    net = compressible_net()
    x = np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ios18 = MILExecutor(compress(net, name, "iOS18"))
    ops = [op for op in ios18._function.operations if op.op_type.startswith("constexpr_")]
    weighted = [m for m in net if hasattr(m, "weight")]
    assert len(ops) == len(weighted) == 3
    decoded = nn.Sequential(*[m for m in compressible_net()]).eval()
    with torch.no_grad():
        for op, module in zip(ops, [m for m in decoded if hasattr(m, "weight")], strict=True):
            weight = decode_ios18(op)
            assert weight.shape == tuple(module.weight.shape)
            module.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
        ref = decoded(torch.from_numpy(x)).numpy()
        fp32 = net(torch.from_numpy(x)).numpy()
    (out,) = ios18.run({"x": x}).values()
    assert rel_err(out, ref) < 1e-5  # the executor computes the compressed network exactly
    assert rel_err(out, fp32) > 1e-4  # and it is a different network from the fp32 one
    # The iOS16 storage of the same compression (packed indices and masks, per-channel
    # zero points) decodes to the same weights.
    (out16,) = MILExecutor(compress(net, name, "iOS16")).run({"x": x}).values()
    assert rel_err(out16, out) < 1e-6


@pytest.mark.parametrize("name", sorted(COMPRESSIONS))
def test_compressed_weights_in_an_fp16_program(name):
    net = compressible_net()
    x = np.random.default_rng(6).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ex = MILExecutor(compress(net, name, "iOS18", precision="fp16"))
    ops = [op for op in ex._function.operations if op.op_type.startswith("constexpr_")]
    decoded = compressible_net()
    with torch.no_grad():
        for op, module in zip(ops, [m for m in decoded if hasattr(m, "weight")], strict=True):
            module.weight.copy_(torch.from_numpy(decode_ios18(op).astype(np.float32)))
        ref = decoded(torch.from_numpy(x)).numpy()
    (out,) = ex.run({"x": x}).values()
    assert out.dtype == np.float16  # iOS16+: fp16 inputs and outputs, fp16 throughout
    assert rel_err(out, ref) < 5e-3  # fp16 rounding of a 3-layer net, measured ~1e-3
