"""Property-based tests (hypothesis) over ODConv layer configurations.

Configurations are drawn consistently (channels divisible by groups, padding within
``k // 2 * dilation``, input big enough for the kernel, non-square H != W) and cover odd
channel counts, kernel sizes 1/3/5/7, stride 1/2, dilation 1/2, plain / grouped / depthwise
convs, kernel_num 1/2/4/8, batch 1..4 and temperatures in [0.5, 5].

Properties:

1. every deploy strategy reproduces train form + folded BatchNorm in float64 to 1e-10
   (relative), and is batch-independent (sample i of a batch == sample i alone);
2. a dynamic-batch ONNX export runs in ONNX Runtime at two batch sizes and matches PyTorch;
3. an fp32 CoreML export, run by the MIL reference executor, matches PyTorch.

Example counts: ``ODCONV_HYPOTHESIS_EXAMPLES`` (default 25) sets the float64 property;
the export properties run ``ODCONV_HYPOTHESIS_EXPORT_EXAMPLES`` (default 8). Runs are
derandomized (the same examples every time) and keep no example database.
"""

import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import export
from odconv_deploy import DEPLOY_STRATEGIES, LAYER_FORMS, ODConv2d, convert_model
from tests.helpers import randomize_odconv

EXAMPLES = int(os.environ.get("ODCONV_HYPOTHESIS_EXAMPLES", "25"))
EXPORT_EXAMPLES = int(os.environ.get("ODCONV_HYPOTHESIS_EXPORT_EXAMPLES", "8"))

COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Strategies whose exported graphs take any batch (dynamic_weight bakes it in; "auto" with a
#: dynamic batch never picks it).
DYNAMIC_BATCH_STRATEGIES = sorted(s for s, cls in DEPLOY_STRATEGIES.items()
                                  if cls.supports_dynamic_batch) + ["auto"]
#: Every way to convert: each named strategy, and "auto" for each (target, dynamic batch) whose
#: rules differ, so the per-layer forms (depthwise_taps included) are all exercised.
CONVERSIONS = [(s, {}) for s in DEPLOY_STRATEGIES] + [
    ("auto", {"target": t, "dynamic_batch": b})
    for t, b in (("onnx", True), ("onnx", False), ("executorch", True))]


@dataclass(frozen=True)
class Config:
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    padding: int
    dilation: int
    groups: int
    kernel_num: int
    batch: int
    height: int
    width: int
    temperature: float
    seed: int

    def layer(self) -> ODConv2d:
        return ODConv2d(self.in_ch, self.out_ch, self.kernel, self.stride, self.padding,
                        self.dilation, self.groups, kernel_num=self.kernel_num)

    def model(self) -> nn.Sequential:
        """ODConv2d followed by a BatchNorm2d (folded by the converter), randomised."""
        model = nn.Sequential(self.layer(), nn.BatchNorm2d(self.out_ch))
        return randomize_odconv(model, seed=self.seed, temperature=self.temperature).eval()

    def input(self, batch: int | None = None, dtype: torch.dtype = torch.float64
              ) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + 1)
        shape = (batch or self.batch, self.in_ch, self.height, self.width)
        return torch.randn(shape, generator=gen, dtype=dtype)


@st.composite
def configs(draw, max_channels: int = 12, max_extra: int = 8) -> Config:
    """A consistent ODConv configuration and input geometry."""
    kernel = draw(st.sampled_from([1, 3, 5, 7]))
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2]))
    padding = draw(st.integers(0, kernel // 2 * dilation))
    mode = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    if mode == "depthwise":
        in_ch = out_ch = groups = draw(st.integers(1, max_channels))
    elif mode == "grouped":
        groups = draw(st.integers(2, 4))
        in_ch = groups * draw(st.integers(1, max_channels // groups))
        out_ch = groups * draw(st.integers(1, max_channels // groups))
    else:
        groups = 1
        in_ch = draw(st.integers(1, max_channels))
        out_ch = draw(st.integers(1, max_channels))
    assert in_ch % groups == 0 and out_ch % groups == 0
    kernel_num = draw(st.sampled_from([1, 2, 4, 8]))
    # Smallest input the padded, dilated kernel fits in.
    smallest = max(1, dilation * (kernel - 1) + 1 - 2 * padding)
    height = smallest + draw(st.integers(0, max_extra))
    width = smallest + draw(st.integers(0, max_extra))
    if width == height:  # always non-square
        width += 1
    return Config(
        in_ch=in_ch, out_ch=out_ch, kernel=kernel, stride=stride, padding=padding,
        dilation=dilation, groups=groups, kernel_num=kernel_num,
        batch=draw(st.integers(1, 4)), height=height, width=width,
        temperature=draw(st.floats(0.5, 5.0, allow_nan=False, allow_infinity=False)),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a busy 2-core machine (OpenMP
    threads spinning against other processes made single convs take 0.1 s). Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _max_abs(a: np.ndarray | torch.Tensor) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64)).max(initial=0.0))


# --------------------------------------------------------------------------------------------
# 1. Train form vs deploy form, float64, every strategy, BatchNorm folded.
# --------------------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES, **COMMON)
@given(cfg=configs())
def test_deploy_forms_match_train_form_float64(cfg):
    model = cfg.model().double()
    x = cfg.input()
    with torch.no_grad():
        ref = model(x)
    expected_hw = tuple(
        (size + 2 * cfg.padding - cfg.dilation * (cfg.kernel - 1) - 1) // cfg.stride + 1
        for size in (cfg.height, cfg.width))
    assert tuple(ref.shape) == (cfg.batch, cfg.out_ch) + expected_hw
    bound = 1e-10 * max(1.0, ref.abs().max().item())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for strategy, options in CONVERSIONS:
        result = convert_model(model, strategy=strategy, **options)
        deploy = result.model
        assert result.folded_bn_count == 1, (strategy, cfg)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules()), strategy
        assert isinstance(deploy[0], LAYER_FORMS[result.layers[0].form])
        assert all(p.dtype == torch.float64 for p in deploy.parameters())
        with torch.no_grad():
            out = deploy(x)
        assert out.shape == ref.shape, (strategy, cfg)
        err = (out - ref).abs().max().item()
        assert err <= bound, f"{strategy}: max|err| {err:.3e} > {bound:.3e} for {cfg}"
        # The converter's own float64 check must agree that the rewrite is exact.
        (record,) = result.layers
        assert record.max_abs_error is not None
        assert record.max_abs_error <= 1e-9 * max(1.0, record.reference_scale)
    # Converting (not inplace) never touches the input model.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@settings(max_examples=max(1, EXAMPLES // 2), **COMMON)
@given(cfg=configs(max_channels=8, max_extra=5))
def test_deploy_forms_are_batch_independent(cfg):
    """Sample i of a batch gives what sample i alone gives (no cross-sample leakage)."""
    model = cfg.model().double()
    x = cfg.input(batch=max(2, cfg.batch))
    for strategy, options in CONVERSIONS:
        deploy = convert_model(model, strategy=strategy, verify=False, **options).model
        with torch.no_grad():
            batched = deploy(x)
            single = torch.cat([deploy(x[i:i + 1]) for i in range(x.shape[0])])
        bound = 1e-12 * max(1.0, single.abs().max().item())
        assert (batched - single).abs().max().item() <= bound, (strategy, cfg)


# --------------------------------------------------------------------------------------------
# 2. ONNX export with a dynamic batch, run in ONNX Runtime at two batch sizes.
# --------------------------------------------------------------------------------------------
@settings(max_examples=EXPORT_EXAMPLES, **COMMON)
@given(cfg=configs(max_channels=8, max_extra=6),
       strategy=st.sampled_from(DYNAMIC_BATCH_STRATEGIES),
       batches=st.lists(st.integers(1, 4), min_size=2, max_size=2, unique=True))
def test_onnx_dynamic_batch_matches_pytorch(cfg, strategy, batches):
    ort = pytest.importorskip("onnxruntime")
    model = cfg.model().float()
    shape = (1, cfg.in_ch, cfg.height, cfg.width)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        result = export.export_onnx(model, path, input_shape=shape, strategy=strategy)
        assert result.ok and result.dynamic_batch
        assert result.input_shapes[result.input_names[0]] == ["batch", *shape[1:]]
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (name,) = result.input_names
        for batch in batches:
            x = cfg.input(batch=batch, dtype=torch.float32)
            with torch.no_grad():
                ref = model(x).numpy()
            (got,) = session.run(None, {name: x.numpy()})
            assert got.shape == ref.shape, (batch, cfg)
            err = _max_abs(got - ref)
            bound = 1e-4 * max(1.0, _max_abs(ref))
            assert err <= bound, f"batch {batch}: max|err| {err:.3e} > {bound:.3e} ({cfg})"


# --------------------------------------------------------------------------------------------
# 3. CoreML (fp32) conversion, executed by the MIL reference executor.
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def execute_mil():
    pytest.importorskip("coremltools")
    module = pytest.importorskip("odconv_deploy.runners.mil")
    return module.execute_mil


@settings(max_examples=EXPORT_EXAMPLES, **COMMON)
@given(cfg=configs(max_channels=8, max_extra=6),
       strategy=st.sampled_from(DYNAMIC_BATCH_STRATEGIES))
def test_coreml_fp32_matches_pytorch_in_mil_executor(execute_mil, cfg, strategy):
    model = cfg.model().float()
    shape = (1, cfg.in_ch, cfg.height, cfg.width)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.mlpackage")
        result = export.export_coreml(model, path, precision="fp32", input_shape=shape,
                                      strategy=strategy)
        assert result.ok and result.details["max_rank"] <= 5
        (name,) = result.input_names
        (out_name,) = result.output_names
        for batch in sorted({1, cfg.batch}):
            x = cfg.input(batch=batch, dtype=torch.float32)
            with torch.no_grad():
                ref = model(x).numpy()
            outputs = execute_mil(path, {name: x.numpy()})
            got = np.asarray(outputs[out_name])
            assert got.shape == ref.shape, (batch, cfg)
            err = _max_abs(got - ref)
            bound = 1e-4 * max(1.0, _max_abs(ref))
            assert math.isfinite(err) and err <= bound, (
                f"batch {batch}: max|err| {err:.3e} > {bound:.3e} ({strategy}, {cfg})")


def test_config_strategy_covers_the_space():
    """The generator reaches every corner the properties claim to cover."""
    seen: dict[str, set] = {"kernel": set(), "stride": set(), "dilation": set(),
                            "kernel_num": set(), "mode": set(), "odd": set(), "pad_max": set()}

    @settings(max_examples=300, **COMMON)
    @given(cfg=configs())
    def collect(cfg):
        assert cfg.height != cfg.width
        assert cfg.in_ch % cfg.groups == 0 and cfg.out_ch % cfg.groups == 0
        assert 0 <= cfg.padding <= cfg.kernel // 2 * cfg.dilation
        assert 0.5 <= cfg.temperature <= 5 and 1 <= cfg.batch <= 4
        seen["kernel"].add(cfg.kernel)
        seen["stride"].add(cfg.stride)
        seen["dilation"].add(cfg.dilation)
        seen["kernel_num"].add(cfg.kernel_num)
        depthwise = cfg.groups == cfg.in_ch == cfg.out_ch and cfg.groups > 1
        seen["mode"].add("depthwise" if depthwise else "grouped" if cfg.groups > 1 else "plain")
        seen["odd"].add(cfg.out_ch % 2 == 1)
        seen["pad_max"].add(cfg.padding == cfg.kernel // 2 * cfg.dilation and cfg.kernel > 1)

    collect()
    assert seen["kernel"] == {1, 3, 5, 7} and seen["stride"] == {1, 2}
    assert seen["dilation"] == {1, 2} and seen["kernel_num"] == {1, 2, 4, 8}
    assert seen["mode"] == {"plain", "grouped", "depthwise"}
    assert seen["odd"] == {True, False} and True in seen["pad_max"]
