"""The MIL reference executor: op kernels against torch/NumPy, whole converted models against
PyTorch at batch 1 and 3, fp32 and fp16, in-memory and from a saved .mlpackage."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ct = pytest.importorskip("coremltools")

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import get_new_symbol  # noqa: E402

from odconv_deploy import create_model, reparameterize_model  # noqa: E402
from odconv_deploy.errors import InputShapeError, ODConvDeployError  # noqa: E402
from odconv_deploy.runners.mil import (  # noqa: E402
    SUPPORTED_OPS,
    MILExecutor,
    UnsupportedMILOpError,
    execute_mil,
    load_mil_program,
)
from odconv_deploy.runners.mil import kernels as mil_kernels  # noqa: E402
from odconv_deploy.synthetic import synthesize_weights  # noqa: E402

FP32_TOL = 1e-4  # max|err| <= tol * max|ref|
FP16_TOL = 2e-2

RNG = np.random.default_rng(0)


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))


def run1(prog, **inputs):
    """Run a one-output program and return that output."""
    (out,) = MILExecutor(prog).run(inputs).values()
    return out


# ------------------------------------------------------------------------------------------
# Op level: small MIL programs built with the Builder
# ------------------------------------------------------------------------------------------

CONV_CASES = [
    # (C_in, C_out, k, stride, dilation, groups, pad_type, pad, bias)
    (4, 6, 3, 1, 1, 1, "custom", [1, 1, 1, 1], True),
    (4, 6, 3, 2, 2, 2, "custom", [2, 1, 0, 3], False),
    (6, 12, 3, 1, 1, 6, "custom", [1, 1, 1, 1], True),  # depthwise, multiplier 2
    (3, 5, 1, 2, 1, 1, "valid", None, False),
    (4, 4, 5, 1, 1, 4, "valid", None, True),
    (3, 8, 3, 2, 1, 1, "same", None, False),
    (3, 8, 4, 3, 1, 1, "same_lower", None, False),
]


def tf_same_pad(size, k, s, d, lower):
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    small, large = total // 2, total - total // 2
    return (large, small) if lower else (small, large)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[6]}-g{c[5]}-s{c[3]}-d{c[4]}")
def test_conv_matches_torch(case):
    c_in, c_out, k, s, d, g, pad_type, pad, has_bias = case
    x = rand(2, c_in, 11, 10)
    w = rand(c_out, c_in // g, k, k)
    b = rand(c_out) if has_bias else None

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        kw = dict(x=x_in, weight=w, strides=[s, s], dilations=[d, d], groups=g,
                  pad_type=pad_type)
        if pad is not None:
            kw["pad"] = pad
        if b is not None:
            kw["bias"] = b
        return mb.conv(**kw)

    if pad_type == "custom":
        t_pad = (pad[2], pad[3], pad[0], pad[1])
    elif pad_type.startswith("same"):
        lower = pad_type == "same_lower"
        (top, bottom), (left, right) = (tf_same_pad(x.shape[2], k, s, d, lower),
                                        tf_same_pad(x.shape[3], k, s, d, lower))
        t_pad = (left, right, top, bottom)
    else:
        t_pad = (0, 0, 0, 0)
    xt = F.pad(torch.from_numpy(x), t_pad)
    ref = F.conv2d(xt, torch.from_numpy(w), None if b is None else torch.from_numpy(b),
                   stride=s, dilation=d, groups=g).numpy()
    out = run1(prog, x_in=x)
    assert out.dtype == np.float32
    assert rel_err(out, ref) < 1e-5


def test_conv_1d_matches_torch():
    x, w = rand(2, 3, 17), rand(4, 3, 3)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return mb.conv(x=x_in, weight=w, strides=[2], pad_type="custom", pad=[1, 2])

    ref = F.conv1d(F.pad(torch.from_numpy(x), (1, 2)), torch.from_numpy(w), stride=2).numpy()
    assert rel_err(run1(prog, x_in=x), ref) < 1e-5


def test_conv_with_computed_weight():
    """Weight produced at run time (as the dynamic_weight deploy form does)."""
    x, w, scale = rand(1, 4, 9, 9), rand(6, 2, 3, 3), rand(6, 1, 1, 1)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape), mb.TensorSpec(shape=w.shape)])
    def prog(x_in, w_in):
        weight = mb.mul(x=w_in, y=scale)
        return mb.conv(x=x_in, weight=weight, groups=2, pad_type="custom", pad=[1, 1, 1, 1])

    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w * scale), padding=1,
                   groups=2).numpy()
    assert rel_err(run1(prog, x_in=x, w_in=w), ref) < 1e-5


@pytest.mark.parametrize("tx,ty", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_transposes_and_broadcast(tx, ty):
    x = rand(2, 1, 4, 3) if tx else rand(2, 1, 3, 4)
    y = rand(5, 6, 4) if ty else rand(5, 4, 6)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape), mb.TensorSpec(shape=y.shape)])
    def prog(a, b):
        return mb.matmul(x=a, y=b, transpose_x=tx, transpose_y=ty)

    ref = np.matmul(np.swapaxes(x, -1, -2) if tx else x, np.swapaxes(y, -1, -2) if ty else y)
    out = run1(prog, a=x, b=y)
    assert out.shape == (2, 5, 3, 6)
    assert rel_err(out, ref) < 1e-6


def test_linear_with_and_without_bias():
    x, w, b = rand(3, 5), rand(4, 5), rand(4)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return mb.add(x=mb.linear(x=x_in, weight=w, bias=b), y=mb.linear(x=x_in, weight=w))

    assert rel_err(run1(prog, x_in=x), 2 * x @ w.T + b) < 1e-6


def test_slice_by_index_masks_negative_indices_strides():
    x = rand(4, 7, 6)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        a = mb.slice_by_index(x=x_in, begin=[1, -5, 0], end=[0, -1, 6], stride=[1, 2, 1],
                              begin_mask=[False, False, True], end_mask=[True, False, False])
        b = mb.slice_by_index(x=x_in, begin=[-1, 0, 5], end=[0, 7, 0], stride=[1, 1, -2],
                              squeeze_mask=[True, False, False], end_mask=[False, False, True])
        c = mb.slice_by_index(x=x_in, begin=[0, 2, -2], end=[4, 3, 0],
                              squeeze_mask=[False, False, True], end_mask=[False, False, True])
        return a, b, c

    out = MILExecutor(prog).run({"x_in": x})
    a, b, c = (out[n] for n in MILExecutor(prog).output_names)
    np.testing.assert_array_equal(a, x[1:, -5:-1:2, :])
    np.testing.assert_array_equal(b, x[-1, :, 5::-2])
    np.testing.assert_array_equal(c, x[0:4, 2:3, -2])


def test_slice_by_size():
    x = rand(3, 8)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return mb.slice_by_size(x=x_in, begin=[1, 2], size=[-1, 4])

    np.testing.assert_array_equal(run1(prog, x_in=x), x[1:, 2:6])


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax(axis):
    x = rand(3, 5, 4) * 4

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return mb.softmax(x=x_in, axis=axis)

    ref = torch.softmax(torch.from_numpy(x), dim=axis).numpy()
    assert rel_err(run1(prog, x_in=x), ref) < 1e-6


@pytest.mark.parametrize("keep_dims", [False, True])
def test_reductions(keep_dims):
    x = rand(2, 3, 4, 5)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return (mb.reduce_mean(x=x_in, axes=[2, -1], keep_dims=keep_dims),
                mb.reduce_sum(x=x_in, axes=[1], keep_dims=keep_dims),
                mb.reduce_max(x=x_in, keep_dims=keep_dims))

    ex = MILExecutor(prog)
    mean, total, peak = (ex.run({"x_in": x})[n] for n in ex.output_names)
    np.testing.assert_allclose(mean, x.mean(axis=(2, 3), keepdims=keep_dims), rtol=1e-6)
    np.testing.assert_allclose(total, x.sum(axis=1, keepdims=keep_dims), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(peak, x.max(axis=None, keepdims=keep_dims))


def test_concat_plain_interleave_and_scalars():
    x, y = rand(2, 3, 4), rand(2, 3, 4)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape), mb.TensorSpec(shape=y.shape)])
    def prog(a, b):
        plain = mb.concat(values=[a, b, a], axis=-2)
        inter = mb.concat(values=[a, b], axis=1, interleave=True)
        dims = mb.shape(x=a)
        n = mb.gather(x=dims, indices=0, axis=0)  # a scalar
        shape = mb.concat(values=[n, np.int32(12)], axis=0)
        return plain, inter, mb.reshape(x=b, shape=shape)

    ex = MILExecutor(prog)
    out = ex.run({"a": x, "b": y})
    plain, inter, flat = (out[n] for n in ex.output_names)
    np.testing.assert_array_equal(plain, np.concatenate([x, y, x], axis=1))
    expect = np.stack([x, y], axis=2).reshape(2, 6, 4)  # a0, b0, a1, b1, ...
    np.testing.assert_array_equal(inter, expect)
    np.testing.assert_array_equal(flat, y.reshape(2, 12))


def test_reshape_transpose_expand_squeeze():
    x = rand(2, 3, 4)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        r = mb.reshape(x=x_in, shape=[0, -1, 2])  # 0 copies dim 0
        t = mb.transpose(x=r, perm=[2, 0, 1])
        e = mb.expand_dims(x=t, axes=[0, -1])
        return mb.squeeze(x=e, axes=[0])

    ref = np.transpose(x.reshape(2, 6, 2), (2, 0, 1))[..., None]
    np.testing.assert_array_equal(run1(prog, x_in=x), ref)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
def test_pad(mode):
    x = rand(1, 2, 5, 6)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        kw = {"constant_val": 1.5} if mode == "constant" else {}
        return mb.pad(x=x_in, pad=[1, 2, 2, 0], mode=mode, **kw)

    t_mode = {"constant": "constant", "reflect": "reflect", "replicate": "replicate"}[mode]
    kw = {"value": 1.5} if mode == "constant" else {}
    ref = F.pad(torch.from_numpy(x), (2, 0, 1, 2), mode=t_mode, **kw).numpy()
    np.testing.assert_array_equal(run1(prog, x_in=x), ref)


POOL_CASES = [
    # (kind, k, stride, pad, ceil_mode, exclude_padding)
    ("max", 3, 2, 1, False, False),
    ("max", 2, 2, 0, True, False),
    ("avg", 3, 2, 1, False, False),
    ("avg", 3, 2, 1, False, True),
    ("avg", 3, 1, 0, False, False),
    ("avg", 2, 2, 1, True, True),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_pool_matches_torch(case):
    kind, k, s, p, ceil_mode, exclude = case
    x = rand(2, 3, 9, 7)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        kw = dict(x=x_in, kernel_sizes=[k, k], strides=[s, s], pad_type="custom",
                  pad=[p] * 4, ceil_mode=ceil_mode)
        if kind == "max":
            return mb.max_pool(**kw)
        return mb.avg_pool(exclude_padding_from_average=exclude, **kw)

    xt = torch.from_numpy(x)
    if kind == "max":
        ref = F.max_pool2d(xt, k, s, p, ceil_mode=ceil_mode)
    else:
        ref = F.avg_pool2d(xt, k, s, p, ceil_mode=ceil_mode, count_include_pad=not exclude)
    assert rel_err(run1(prog, x_in=x), ref.numpy()) < 1e-6


def test_pool_same_padding():
    x = rand(1, 2, 7, 8)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return mb.max_pool(x=x_in, kernel_sizes=[3, 3], strides=[2, 2], pad_type="same")

    (top, bottom), (left, right) = tf_same_pad(7, 3, 2, 1, False), tf_same_pad(8, 3, 2, 1, False)
    xt = F.pad(torch.from_numpy(x), (left, right, top, bottom), value=-np.inf)
    np.testing.assert_array_equal(run1(prog, x_in=x), F.max_pool2d(xt, 3, 2).numpy())


def test_gather_batch_dims_and_negative_indices():
    x = rand(2, 5, 3)
    idx = np.array([[0, -1, 2], [4, 4, -5]], dtype=np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS16)
    def prog(x_in):
        return (mb.gather(x=x_in, indices=idx, axis=1, batch_dims=1),
                mb.gather(x=x_in, indices=np.int32(-2), axis=1))

    ex = MILExecutor(prog)
    batched, scalar = (ex.run({"x_in": x})[n] for n in ex.output_names)
    np.testing.assert_array_equal(batched, np.stack([x[b][idx[b]] for b in range(2)]))
    np.testing.assert_array_equal(scalar, x[:, -2])


def test_elementwise_and_misc_ops():
    x, y = rand(2, 3), rand(2, 3)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape), mb.TensorSpec(shape=y.shape)])
    def prog(a, b):
        return (mb.real_div(x=a, y=mb.add(x=mb.abs(x=b), y=1.0)),
                mb.select(cond=mb.greater(x=a, y=b), a=a, b=b),
                mb.tile(x=a, reps=[2, 1]),
                mb.clip(x=a, alpha=-0.5, beta=0.5),
                mb.relu6(x=mb.mul(x=a, y=10.0)),
                mb.split(x=a, split_sizes=[1, 2], axis=1)[1],
                mb.fill(shape=[2, 2], value=3.0))

    ex = MILExecutor(prog)
    got = [ex.run({"a": x, "b": y})[n] for n in ex.output_names]
    expect = [x / (np.abs(y) + 1), np.where(x > y, x, y), np.tile(x, (2, 1)),
              np.clip(x, -0.5, 0.5), np.clip(10 * x, 0, 6), x[:, 1:], np.full((2, 2), 3.0)]
    for g, e in zip(got, expect, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6)


def test_batch_norm():
    x = rand(2, 4, 3, 3)
    mean, var, gamma, beta = rand(4), np.abs(rand(4)) + 0.1, rand(4), rand(4)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return mb.batch_norm(x=x_in, mean=mean, variance=var, gamma=gamma, beta=beta,
                             epsilon=1e-3)

    ref = F.batch_norm(torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(var),
                       torch.from_numpy(gamma), torch.from_numpy(beta), eps=1e-3).numpy()
    assert rel_err(run1(prog, x_in=x), ref) < 1e-6


def test_fp16_program_stores_fp16_and_accumulates_in_fp32():
    """Documented policy: fp16 vars hold float16; conv accumulates in float32, rounds once."""
    x, w = rand(1, 16, 6, 6), rand(8, 16, 3, 3)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        h = mb.cast(x=x_in, dtype="fp16")
        y = mb.conv(x=h, weight=w.astype(np.float16), pad_type="same")
        return mb.softmax(x=y, axis=1)  # fp16 output

    out = run1(prog, x_in=x)
    assert out.dtype == np.float16
    conv = F.conv2d(torch.from_numpy(x.astype(np.float16).astype(np.float32)),
                    torch.from_numpy(w.astype(np.float16).astype(np.float32)), padding=1)
    conv16 = conv.numpy().astype(np.float16).astype(np.float32)
    ref = torch.softmax(torch.from_numpy(conv16), dim=1).numpy().astype(np.float16)
    np.testing.assert_array_equal(out, ref)


def test_symbolic_batch_program():
    batch = get_new_symbol()

    @mb.program(input_specs=[mb.TensorSpec(shape=(batch, 3, 4))])
    def prog(x_in):
        n = mb.gather(x=mb.shape(x=x_in), indices=0, axis=0)
        shape = mb.concat(values=[n, np.int32(-1)], axis=0)
        return mb.reduce_sum(x=mb.reshape(x=x_in, shape=shape), axes=[1])

    ex = MILExecutor(prog)
    for b in (1, 3):
        x = rand(b, 3, 4)
        np.testing.assert_allclose(ex.run({"x_in": x})[ex.output_names[0]],
                                   x.reshape(b, -1).sum(1), rtol=1e-5)


def test_input_validation():
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def prog(x_in):
        return mb.relu(x=x_in)

    ex = MILExecutor(prog)
    with pytest.raises(InputShapeError, match="missing"):
        ex.run({})
    with pytest.raises(InputShapeError, match="expects"):
        ex.run({"x_in": rand(3, 3)})
    with pytest.raises(ODConvDeployError):
        MILExecutor(prog, function="nope")


# ------------------------------------------------------------------------------------------
# Failing loudly
# ------------------------------------------------------------------------------------------


def test_unknown_op_fails_before_running(monkeypatch):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 5))])
    def prog(x_in):
        return mb.argsort(x=mb.relu(x=x_in))

    calls = []
    real_relu = mil_kernels._KERNELS["relu"]
    monkeypatch.setitem(mil_kernels._KERNELS, "relu",
                        lambda ctx: calls.append(1) or real_relu(ctx))
    assert "argsort" not in SUPPORTED_OPS
    ex = MILExecutor(prog)
    with pytest.raises(UnsupportedMILOpError, match="argsort") as info:
        ex.run({"x_in": rand(2, 5)})
    assert "Supported op types" in str(info.value) and "conv" in str(info.value)
    assert isinstance(info.value, NotImplementedError)
    assert calls == []  # nothing ran
    with pytest.raises(UnsupportedMILOpError):
        ex.check_supported()


def test_removed_kernel_is_reported(monkeypatch):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 5))])
    def prog(x_in):
        return mb.softmax(x=mb.sigmoid(x=x_in), axis=-1)

    monkeypatch.delitem(mil_kernels._KERNELS, "softmax")
    with pytest.raises(UnsupportedMILOpError, match=r"softmax \(x1\)"):
        MILExecutor(prog).run({"x_in": rand(2, 5)})


def test_supported_ops_cover_the_brief():
    needed = {"const", "cast", "conv", "linear", "matmul", "add", "sub", "mul", "real_div",
              "maximum", "minimum", "relu", "relu6", "clip", "sigmoid", "softmax",
              "reduce_mean", "reduce_sum", "reshape", "transpose", "expand_dims", "squeeze",
              "slice_by_index", "slice_by_size", "concat", "pad", "max_pool", "avg_pool",
              "shape", "gather", "select", "tile", "fill", "split", "batch_norm", "identity"}
    assert needed <= SUPPORTED_OPS


# ------------------------------------------------------------------------------------------
# Whole models: converted od_tinynet / tinynet against PyTorch
# ------------------------------------------------------------------------------------------


def convert(model, precision, *, target="iOS15", flexible=True, shape=(3, 32, 32)):
    batch = ct.RangeDim(1, 64, default=1) if flexible else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.zeros(1, *shape))
        return ct.convert(
            traced, inputs=[ct.TensorType(name="image", shape=ct.Shape((batch,) + shape))],
            outputs=[ct.TensorType(name="logits")], convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=(ct.precision.FLOAT16 if precision == "fp16"
                               else ct.precision.FLOAT32),
            skip_model_load=True,
        )


class GrabBag(torch.nn.Module):
    """Ops that other deploy variants may produce: slice im2col, activations, pools, norms."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        xp = F.pad(x, (1, 1, 1, 1))
        cols = torch.cat([xp[:, :, i:i + 16:2, j:j + 16:2] for i in range(3) for j in range(3)],
                         dim=1)[:, :6]
        y = self.conv(cols)
        y = (F.hardswish(y) + F.gelu(y) + F.silu(y) + F.leaky_relu(y, 0.1) + F.elu(y)
             + F.hardsigmoid(y))
        a, b = torch.chunk(y, 2, dim=1)
        y = torch.cat([a * b.mean(dim=(2, 3), keepdim=True), b[:, :1].expand(-1, 4, -1, -1)], 1)
        y = F.avg_pool2d(F.max_pool2d(y, 3, 2, 1, ceil_mode=True), 2, 2)
        y = self.norm(F.adaptive_avg_pool2d(y, 1).flatten(1))
        y = y / (y.abs().sum(dim=1, keepdim=True) + 1) - torch.sqrt(y * y + 1)
        return (y * y.max(dim=1, keepdim=True).values + torch.argmax(y, 1)[:, None].float()
                + torch.clamp(y, -0.2, 0.3) + torch.where(y > 0, y, -y) + y.pow(2))


def test_grab_bag_model_matches_pytorch():
    torch.manual_seed(0)
    model = GrabBag().eval()
    ex = MILExecutor(convert(model, "fp32", shape=(3, 16, 16)))
    assert {"pad", "split", "gelu", "layer_norm", "max_pool", "avg_pool", "reduce_argmax",
            "select", "tile"} <= set(ex.op_types)
    for batch in (1, 3):
        x = images(batch, seed=30 + batch, shape=(3, 16, 16))
        (out,) = ex.run({"image": x}).values()
        assert rel_err(out, torch_ref(model, x)) <= FP32_TOL


@pytest.fixture(scope="module")
def od_tinynet():
    model = synthesize_weights(create_model("od_tinynet", kernel_num=4))
    return {s: reparameterize_model(model, strategy=s).eval()
            for s in ("im2col", "static_weight", "dynamic_weight")}


@pytest.fixture(scope="module")
def converted(od_tinynet):
    cache = {}

    def get(strategy, precision, target="iOS15"):
        key = (strategy, precision, target)
        if key not in cache:
            cache[key] = convert(od_tinynet[strategy], precision, target=target,
                                 flexible=strategy != "dynamic_weight")
        return cache[key]

    return get


def torch_ref(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def images(batch, seed=0, shape=(3, 32, 32)):
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("strategy", ["im2col", "static_weight"])
def test_od_tinynet_deploy_form_matches_pytorch(od_tinynet, converted, strategy, precision):
    mlmodel = converted(strategy, precision)
    ex = MILExecutor(mlmodel)
    assert ex.input_names == ["image"] and ex.output_names == ["logits"]
    assert ex.op_types["conv"] > 0
    assert ("cast" in ex.op_types) == (precision == "fp16")
    tol = FP32_TOL if precision == "fp32" else FP16_TOL
    for batch in (1, 3):  # the same program, flexible batch
        x = images(batch, seed=batch)
        out = ex.run({"image": x})["logits"]
        assert out.shape == (batch, 10) and out.dtype == np.float32
        err = rel_err(out, torch_ref(od_tinynet[strategy], x))
        assert err <= tol, f"{strategy} {precision} batch {batch}: rel err {err:.3g}"
        if precision == "fp16":
            assert err > 1e-6  # fp16 rounding is really applied


def test_od_tinynet_fp16_ios18_takes_fp16_inputs(od_tinynet, converted):
    ex = MILExecutor(converted("static_weight", "fp16", "iOS18"))
    x = images(3, seed=5)
    out = ex.run({"image": x})["logits"]
    assert out.dtype == np.float16
    assert rel_err(out, torch_ref(od_tinynet["static_weight"], x)) <= FP16_TOL


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_od_tinynet_dynamic_weight_batch1(od_tinynet, converted, precision):
    ex = MILExecutor(converted("dynamic_weight", precision))
    x = images(1, seed=7)
    tol = FP32_TOL if precision == "fp32" else FP16_TOL
    assert rel_err(ex.run({"image": x})["logits"],
                   torch_ref(od_tinynet["dynamic_weight"], x)) <= tol
    with pytest.raises(InputShapeError):  # the batch is baked in
        ex.run({"image": images(3)})


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_static_twin_matches_pytorch(precision):
    model = synthesize_weights(create_model("tinynet")).eval()
    ex = MILExecutor(convert(model, precision))
    tol = FP32_TOL if precision == "fp32" else FP16_TOL
    for batch in (1, 3):
        x = images(batch, seed=11 + batch)
        assert rel_err(ex.run({"image": x})["logits"], torch_ref(model, x)) <= tol


@pytest.fixture(scope="module")
def saved_fp32(converted, tmp_path_factory):
    path = tmp_path_factory.mktemp("mil") / "od_tinynet.mlpackage"
    converted("im2col", "fp32").save(str(path))
    return path


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_saved_mlpackage_gives_the_same_numbers(converted, tmp_path, precision):
    mlmodel = converted("im2col", precision)
    path = tmp_path / "m.mlpackage"
    mlmodel.save(str(path))
    loaded = load_mil_program(path)  # rebuilt from the spec + weight blobs
    assert loaded is not mlmodel._mil_program
    from_disk = MILExecutor(str(path))
    in_memory = MILExecutor(mlmodel)
    assert from_disk.op_types == in_memory.op_types
    x = images(3, seed=3)
    np.testing.assert_array_equal(from_disk.run({"image": x})["logits"],
                                  in_memory.run({"image": x})["logits"])
    np.testing.assert_array_equal(execute_mil(path, {"image": x})["logits"],
                                  in_memory.run({"image": x})["logits"])


def test_load_rejects_missing_path(tmp_path):
    with pytest.raises(ODConvDeployError, match="No CoreML model"):
        load_mil_program(tmp_path / "missing.mlpackage")


def perturb_first_conv_weight(program, factor):
    """Replace the const weight of the first conv by ``weight * factor`` (a MIL graph edit)."""
    fn = program.functions["main"]
    conv = next(op for op in fn.operations
                if op.op_type == "conv" and op.weight.op is not None
                and op.weight.op.op_type == "const")
    old = conv.weight
    with fn:
        new = mb.const(val=(old.val * factor).astype(old.val.dtype), before_op=conv)
    conv.enclosing_block.replace_uses_of_var_after_op(anchor_op=new.op, old_var=old,
                                                      new_var=new)
    return conv.name


def test_perturbed_weight_fails_the_comparison(od_tinynet, saved_fp32):
    """The check can fail: a 1% change of one conv weight breaks the fp32 tolerance."""
    x = images(3, seed=21)
    ref = torch_ref(od_tinynet["im2col"], x)
    program = load_mil_program(saved_fp32)  # a fresh program, safe to edit
    assert rel_err(MILExecutor(program).run({"image": x})["logits"], ref) <= FP32_TOL
    perturb_first_conv_weight(program, 1.01)
    err = rel_err(MILExecutor(program).run({"image": x})["logits"], ref)
    assert err > FP32_TOL, f"perturbation went unnoticed (rel err {err:.3g})"


def test_zoo_model_od_resnet18_matches_pytorch():
    model = synthesize_weights(create_model("od_resnet18", kernel_num=1))
    deploy = reparameterize_model(model, strategy="im2col").eval()
    ex = MILExecutor(convert(deploy, "fp32", shape=(3, 224, 224)))
    assert {"max_pool", "conv", "matmul", "reduce_mean", "slice_by_index"} <= set(ex.op_types)
    x = images(2, seed=1, shape=(3, 224, 224))
    assert rel_err(ex.run({"image": x})["logits"], torch_ref(deploy, x)) <= FP32_TOL
