"""MIL reference executor: the resizing / upsampling ops of detector necks (FPN, YOLO).

Whole converted torch modules (mlprogram, fp32 and fp16, iOS15 and iOS17 targets) against
PyTorch, the sampling grids against the examples in coremltools' MIL op definitions, and the
cases whose Core ML semantics are not documented against a refusal (UnsupportedMILOpError).
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

ct = pytest.importorskip("coremltools")

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import get_new_symbol  # noqa: E402

from odconv_deploy.runners.mil import MILExecutor, UnsupportedMILOpError  # noqa: E402
from odconv_deploy.runners.mil.kernels import _linear_grid  # noqa: E402
from tests.test_mil_executor import rel_err, run1  # noqa: E402

FP32_TOL = 1e-5  # max|err| <= tol * max|ref|; float32 arithmetic ops
FP16_TOL = 2e-2


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def convert(module, precision, target, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.eval(), torch.zeros(shape))
        return ct.convert(
            traced, inputs=[ct.TensorType(name="x", shape=shape)], convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=(ct.precision.FLOAT16 if precision == "fp16"
                               else ct.precision.FLOAT32),
            skip_model_load=True,
        )


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class FPNFragment(nn.Module):
    """A top-down FPN / YOLO-PAN step: lateral 1x1s, nearest 2x upsample, concat, smooth."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.lat_hi = nn.Conv2d(8, 6, 1)
        self.lat_lo = nn.Conv2d(4, 6, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.smooth = nn.Conv2d(12, 6, 3, padding=1)

    def forward(self, x):
        p_hi = self.lat_hi(F.relu(self.down(x)))
        p_lo = torch.cat([self.up(p_hi), self.lat_lo(x)], dim=1)
        return self.smooth(p_lo) + F.interpolate(p_hi, scale_factor=2, mode="bilinear",
                                                 align_corners=False)


def _conv_transpose():
    torch.manual_seed(0)
    return nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)


# name -> (module factory, input shape, MIL ops that must appear, exact in fp32, targets)
CASES = {
    "nearest_x2": (lambda: nn.Upsample(scale_factor=2, mode="nearest"), (1, 4, 6, 8),
                   {"upsample_nearest_neighbor"}, True, ("iOS15", "iOS17")),
    "bilinear_x2": (lambda: Fn(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear",
                                                       align_corners=False)),
                    (1, 4, 6, 8), {"upsample_bilinear"}, False, ("iOS15", "iOS17")),
    "bilinear_x2_align": (lambda: Fn(lambda x: F.interpolate(x, scale_factor=2, mode="bilinear",
                                                             align_corners=True)),
                          (1, 4, 6, 8), {"upsample_bilinear"}, False, ("iOS15", "iOS17")),
    "bilinear_size": (lambda: Fn(lambda x: F.interpolate(x, size=(13, 11), mode="bilinear",
                                                         align_corners=False)),
                      (1, 4, 6, 8), {"upsample_bilinear"}, False, ("iOS15", "iOS17")),
    "bilinear_size_align": (lambda: Fn(lambda x: F.interpolate(x, size=(13, 11), mode="bilinear",
                                                               align_corners=True)),
                            (1, 4, 6, 8), {"upsample_bilinear"}, False, ("iOS15", "iOS17")),
    "nearest_size": (lambda: Fn(lambda x: F.interpolate(x, size=(13, 11), mode="nearest")),
                     (1, 4, 6, 8), {"upsample_nearest_neighbor"}, True, ("iOS15", "iOS17")),
    # 6 -> 9, 8 -> 12: here floor(i / scale) would read other rows than floor(i * in / out).
    "nearest_size_shared_factor": (lambda: Fn(lambda x: F.interpolate(x, size=(9, 12),
                                                                      mode="nearest")),
                                   (1, 4, 6, 8), {"upsample_nearest_neighbor"}, True,
                                   ("iOS15",)),
    "pixel_shuffle": (lambda: nn.PixelShuffle(2), (1, 8, 5, 6), {"pixel_shuffle"}, True,
                      ("iOS15", "iOS17")),
    # pixel_unshuffle exists from iOS16 on (coremltools refuses to convert it for iOS15).
    "pixel_unshuffle": (lambda: nn.PixelUnshuffle(2), (1, 3, 6, 8), {"pixel_unshuffle"}, True,
                        ("iOS17",)),
    # output_padding is converted to conv_transpose(pad 0, output_shape) + crop.
    "conv_transpose": (_conv_transpose, (1, 4, 6, 8), {"conv_transpose", "crop"}, False,
                       ("iOS15", "iOS17")),
    "fpn_fragment": (lambda: (torch.manual_seed(0), FPNFragment())[1], (1, 4, 16, 16),
                     {"upsample_nearest_neighbor", "upsample_bilinear", "concat", "conv"},
                     False, ("iOS15", "iOS17")),
}

PARAMS = [(name, precision, target) for name, case in CASES.items() for target in case[4]
          for precision in ("fp32", "fp16")]


@pytest.mark.parametrize("name,precision,target", PARAMS, ids=["-".join(p) for p in PARAMS])
def test_converted_module_matches_pytorch(name, precision, target):
    factory, shape, ops, exact, _ = CASES[name]
    module = factory().eval()
    ex = MILExecutor(convert(module, precision, target, shape))
    print(f"{name} {precision} {target}: {dict(sorted(ex.op_types.items()))}")
    assert ops <= set(ex.op_types), f"{ops - set(ex.op_types)} missing from {ex.op_types}"
    x = rand(*shape, seed=len(name))
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    (out,) = ex.run({"x": x}).values()
    if precision == "fp16":
        assert rel_err(out, ref) <= FP16_TOL
    elif exact:  # pure data movement: bit-exact
        np.testing.assert_array_equal(out, ref)
    else:
        assert rel_err(out, ref) <= FP32_TOL


def test_size_conversions_use_fractional_scales():
    """F.interpolate(size=...) with a non-integer ratio really hits the fractional path."""
    for mode in ("nearest", "bilinear"):
        ex = MILExecutor(convert(CASES[f"{mode}_size"][0](), "fp32", "iOS15", (1, 4, 6, 8)))
        (op,) = [o for o in ex._function.operations if o.op_type.startswith("upsample")]
        scales = [float(op.scale_factor_height.val), float(op.scale_factor_width.val)]
        assert all(s % 1 for s in scales), scales


# ------------------------------------------------------------------------------------------
# The documented sampling grids (coremltools' MIL op definitions and op tests)
# ------------------------------------------------------------------------------------------

DOC_GRIDS = {  # Xin = 2: the "Grid points" table of resize_bilinear's docstring
    ("UNALIGN_CORNERS", 5): [0.0, 0.1, 0.5, 0.9, 1.0],
    ("STRICT_ALIGN_CORNERS", 5): [0.0, 0.25, 0.5, 0.75, 1.0],
    ("ALIGN_CORNERS", 5): [0.0, 0.25, 0.5, 0.75, 1.0],
    ("DEFAULT", 5): [0.0, 0.4, 0.8, 1.0, 1.0],
    ("OFFSET_CORNERS", 5): [0.1, 0.3, 0.5, 0.7, 0.9],
    ("UNALIGN_CORNERS", 6): [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0],
    ("STRICT_ALIGN_CORNERS", 6): [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
    ("DEFAULT", 6): [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0],
    ("OFFSET_CORNERS", 6): [1 / 12, 0.25, 5 / 12, 7 / 12, 0.75, 11 / 12],
}


@pytest.mark.parametrize("mode,n_out", list(DOC_GRIDS), ids=lambda v: str(v))
def test_resize_bilinear_documented_grids(mode, n_out):
    x = np.array([0.0, 1.0], dtype=np.float32).reshape(1, 1, 2)  # value == coordinate

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return mb.resize_bilinear(x=x_in, target_size_height=1, target_size_width=n_out,
                                  sampling_mode=mode)

    np.testing.assert_allclose(run1(prog, x_in=x).reshape(-1), DOC_GRIDS[mode, n_out],
                               atol=1e-6)


def test_align_corners_single_output():
    assert _linear_grid("ALIGN_CORNERS", 5, 1).tolist() == [2.0]
    assert _linear_grid("STRICT_ALIGN_CORNERS", 5, 1).tolist() == [0.0]


@pytest.mark.parametrize("mode,align", [("STRICT_ALIGN_CORNERS", True),
                                        ("UNALIGN_CORNERS", False)])
def test_resize_bilinear_2d_matches_torch(mode, align):
    x = rand(2, 3, 5, 7)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return mb.resize_bilinear(x=x_in, target_size_height=9, target_size_width=4,
                                  sampling_mode=mode)

    ref = F.interpolate(torch.from_numpy(x), size=(9, 4), mode="bilinear", align_corners=align)
    assert rel_err(run1(prog, x_in=x), ref.numpy()) <= FP32_TOL


def test_upsample_bilinear_documented_examples():
    x = np.array([0.0, 1.0], dtype=np.float32).reshape(1, 1, 2)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return (mb.upsample_bilinear(x=x_in, scale_factor_height=1, scale_factor_width=3,
                                     align_corners=True),
                mb.upsample_bilinear(x=x_in, scale_factor_height=1.0, scale_factor_width=2.6,
                                     align_corners=False))

    ex = MILExecutor(prog)
    a, b = (ex.run({"x_in": x})[n] for n in ex.output_names)
    np.testing.assert_allclose(a.reshape(-1), [0, 0.2, 0.4, 0.6, 0.8, 1], atol=1e-6)
    np.testing.assert_allclose(b.reshape(-1), [0, 0.1, 0.5, 0.9, 1], atol=1e-6)


def test_upsample_nearest_documented_fractional_example():
    x = np.array([1.5, -2.5, 3.5], dtype=np.float32).reshape(1, 1, 1, 3)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return (mb.upsample_nearest_neighbor(x=x_in, scale_factor_height=3.17,
                                             scale_factor_width=0.67),
                mb.upsample_nearest_neighbor(x=x_in, scale_factor_height=2.0,
                                             scale_factor_width=1.12))

    ex = MILExecutor(prog)
    a, b = (ex.run({"x_in": x})[n] for n in ex.output_names)
    np.testing.assert_array_equal(a.reshape(3, 2), [[1.5, -2.5]] * 3)
    np.testing.assert_array_equal(b.reshape(2, 3), [[1.5, -2.5, 3.5]] * 2)


def test_resize_nearest_neighbor_is_half_pixel():
    x = rand(1, 2, 5, 7)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return mb.resize_nearest_neighbor(x=x_in, target_size_height=8, target_size_width=3)

    ref = F.interpolate(torch.from_numpy(x), size=(8, 3), mode="nearest-exact").numpy()
    np.testing.assert_array_equal(run1(prog, x_in=x), ref)


def test_ios17_resize_documented_examples_and_dynamic_shape():
    nn_x = np.array([-6.174, 9.371], dtype=np.float32).reshape(1, 1, 2, 1)
    lin_x = np.array([0.0, 1.0], dtype=np.float32).reshape(1, 1, 2)
    shape_val = np.array([1, 1, 3, 2], dtype=np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=nn_x.shape), mb.TensorSpec(shape=lin_x.shape),
                             mb.TensorSpec(shape=(4,), dtype=ct.converters.mil.mil.types.int32)],
                opset_version=ct.target.iOS17)
    def prog(a, b, shape):
        return (mb.resize(x=a, shape=shape, resized_dims=np.uint32(2),
                          interpolation_mode="NEAREST_NEIGHBOR"),
                mb.resize(x=b, shape=[1, 1, 5], resized_dims=np.uint32(2)),
                mb.resize(x=b, shape=[0, 4], resized_dims=np.uint32(2),
                          sampling_mode="STRICT_ALIGN_CORNERS"))

    ex = MILExecutor(prog)
    assert ex.op_types["resize"] == 3
    out = ex.run({"a": nn_x, "b": lin_x, "shape": shape_val})
    near, lin, keep = (out[n] for n in ex.output_names)
    np.testing.assert_array_equal(near.reshape(3, 2), nn_x.reshape(2, 1)[[0, 1, 1]].repeat(2, 1))
    np.testing.assert_allclose(lin.reshape(-1), [0, 0.4, 0.8, 1, 1], atol=1e-6)
    np.testing.assert_allclose(keep.reshape(-1), [0, 1 / 3, 2 / 3, 1], atol=1e-6)
    assert keep.shape == (1, 1, 4)


def test_crop():
    x = rand(2, 3, 7, 6)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return mb.crop(x=x_in, crop_height=[1, 2], crop_width=[0, 3])

    np.testing.assert_array_equal(run1(prog, x_in=x), x[:, :, 1:5, 0:3])


CONV_T_CASES = [
    # (C_in, C_out, k, stride, dilation, groups, pad_type, pad)
    (4, 6, 3, 2, 1, 2, "custom", [1, 1, 1, 1]),
    (4, 4, 4, 2, 1, 4, "custom", [1, 2, 0, 1]),
    (3, 5, 3, 3, 2, 1, "valid", None),
    (2, 4, 3, 2, 1, 1, "same", None),
    (2, 4, 4, 2, 2, 2, "same", None),
]


@pytest.mark.parametrize("case", CONV_T_CASES,
                         ids=lambda c: f"{c[6]}-k{c[2]}-s{c[3]}-d{c[4]}-g{c[5]}")
def test_conv_transpose_matches_torch(case):
    c_in, c_out, k, s, d, g, pad_type, pad = case
    x, w, b = rand(2, c_in, 5, 4), rand(c_in, c_out // g, k, k, seed=1), rand(c_out, seed=2)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        kw = {} if pad is None else {"pad": pad}
        return mb.conv_transpose(x=x_in, weight=w, bias=b, strides=[s, s], dilations=[d, d],
                                 groups=g, pad_type=pad_type, **kw)

    full = F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                              stride=s, dilation=d, groups=g).numpy()
    if pad_type == "same":  # TF: output in*stride, the odd cropped element after
        crops = []
        for size, n_in in zip(full.shape[2:], x.shape[2:], strict=True):
            total = size - n_in * s
            crops += [total // 2, total - total // 2]
    else:
        crops = pad or [0] * 4
    ref = full[:, :, crops[0]:full.shape[2] - crops[1], crops[2]:full.shape[3] - crops[3]]
    assert rel_err(run1(prog, x_in=x), ref) <= FP32_TOL


def test_conv_transpose_1d():
    x, w = rand(1, 3, 6), rand(3, 2, 3, seed=1)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)])
    def prog(x_in):
        return mb.conv_transpose(x=x_in, weight=w, strides=[2], pad_type="custom", pad=[1, 0])

    ref = F.conv_transpose1d(torch.from_numpy(x), torch.from_numpy(w), stride=2).numpy()[..., 1:]
    assert rel_err(run1(prog, x_in=x), ref) <= FP32_TOL


# ------------------------------------------------------------------------------------------
# Refusals: undocumented modes fail loudly, naming the op and the mode
# ------------------------------------------------------------------------------------------


def test_fractional_nearest_with_ambiguous_rounding_is_refused_before_running():
    """14 -> 46 rows: 23 * 14 / 46 is exactly 7, but float32 (torch) computes 6.9999..."""
    module = Fn(lambda x: F.interpolate(x, size=(46, 8), mode="nearest"))
    ex = MILExecutor(convert(module, "fp32", "iOS15", (1, 2, 14, 8)))
    assert "upsample_nearest_neighbor" in ex.op_types
    with pytest.raises(UnsupportedMILOpError,
                       match=r"upsample_nearest_neighbor.*height 14 -> 46: output 23"):
        ex.check_supported()


def test_runtime_sizes_refusal_is_raised_when_the_op_runs():
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 1, get_new_symbol(), 4))],
                opset_version=ct.target.iOS16)
    def prog(x_in):
        return mb.upsample_nearest_neighbor(x=x_in, scale_factor_height=46.0001 / 14,
                                            scale_factor_width=1.0)

    ex = MILExecutor(prog)
    ex.check_supported()  # the height is not known yet
    x = rand(1, 1, 5, 4)
    out = ex.run({"x_in": x})[ex.output_names[0]]  # 5 -> 16: unambiguous
    np.testing.assert_array_equal(out, F.interpolate(torch.from_numpy(x), size=(16, 4)).numpy())
    with pytest.raises(UnsupportedMILOpError, match="upsample_nearest_neighbor.*refused"):
        ex.run({"x_in": rand(1, 1, 14, 4)})  # 14 -> 46: ambiguous rounding


@pytest.mark.parametrize("align,half_pixel", [(False, False), (True, True)])
def test_upsample_bilinear_undocumented_combination_is_refused(align, half_pixel):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 3, 4))], opset_version=ct.target.iOS16)
    def prog(x_in):
        return mb.upsample_bilinear(x=x_in, scale_factor_height=2, scale_factor_width=2,
                                    align_corners=align, half_pixel_centers=half_pixel)

    with pytest.raises(UnsupportedMILOpError, match=f"align_corners={align} with "
                                                    f"half_pixel_centers={half_pixel}"):
        MILExecutor(prog).run({"x_in": rand(1, 2, 3, 4)})


def test_ios17_resize_nearest_with_other_sampling_mode_is_refused():
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 3, 4))], opset_version=ct.target.iOS17)
    def prog(x_in):
        return mb.resize(x=x_in, shape=[6, 8], resized_dims=np.uint32(2),
                         interpolation_mode="NEAREST_NEIGHBOR", sampling_mode="ALIGN_CORNERS")

    with pytest.raises(UnsupportedMILOpError, match="resize.*NEAREST_NEIGHBOR.*ALIGN_CORNERS"):
        MILExecutor(prog).check_supported()


def test_conv_transpose_output_shape_mismatch_is_refused():
    w = rand(2, 3, 3, 3)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 4, 4))])
    def prog(x_in):
        return mb.conv_transpose(x=x_in, weight=w, strides=[2, 2], pad_type="valid",
                                 output_shape=[1, 3, 10, 10])

    with pytest.raises(UnsupportedMILOpError, match="conv_transpose.*output_shape"):
        MILExecutor(prog).check_supported()
