"""dynamic_linear: refused where it does not fit, delegated whole to XNNPACK, and exact there."""

import numpy as np
import pytest
import torch
from torch import nn

from odconv_deploy import DynamicLinearODConv2d, ODConv2d
from odconv_deploy.detect import inspect_odconv
from odconv_deploy.errors import UnsupportedLayerError
from odconv_deploy.reparameterize import convert_model
from odconv_deploy.strategy_choice import TUNE_STRATEGY
from odconv_deploy.tolerance import within_tolerance
from tests.helpers import randomize_odconv


@pytest.mark.parametrize("cout,stride,groups,what", [
    (16, 1, 2, "groups=2"), (8, 1, 8, "groups=8"), (16, 2, 1, "stride=2")])
def test_other_layers_are_refused_with_what_fits(cout, stride, groups, what):
    layer = ODConv2d(8, cout, 3, stride, 1, 1, groups, kernel_num=4).eval()
    with pytest.raises(UnsupportedLayerError, match=f"stride-1 convs only.*{what}.*'tune'"):
        DynamicLinearODConv2d.from_spec(inspect_odconv(layer))


def test_an_executorch_program_delegates_every_linear_and_matches_pytorch(tmp_path):
    """3x3 and 1x1 layers with a folded BatchNorm (a bias), ReLU, pooling and a classifier: all
    of it in one XNNPACK subgraph (the computed weights go to its fully-connected op), and the
    program's outputs match the train-form network's."""
    pytest.importorskip("executorch")
    from export.to_executorch import export_executorch
    from odconv_deploy.runners import ExecuTorchRunner

    net = nn.Sequential(ODConv2d(8, 16, 3, 1, 1, kernel_num=4), nn.BatchNorm2d(16), nn.ReLU(),
                        ODConv2d(16, 12, 1, kernel_num=4), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(12, 5))
    net = randomize_odconv(net, seed=1).eval()
    deploy = convert_model(net, strategy=TUNE_STRATEGY,
                           plan=("dynamic_linear", "dynamic_linear")).model.eval()
    assert sum(isinstance(m, DynamicLinearODConv2d) for m in deploy.modules()) == 2
    result = export_executorch(deploy, tmp_path / "net.pte", dynamic_batch=False,
                               input_shape=(1, 8, 20, 20))
    details = result.details
    assert details["delegated_subgraphs"] == 1 and details["non_delegated_op_types"] == []
    linears = details["delegation_by_operator"]["aten_linear_default"]
    assert linears["non_delegated"] == 0 and linears["delegated"] >= 4  # 2 computed weights
    assert details["conv_matmul_macs_delegated_share"] == 1.0
    x = torch.randn(1, 8, 20, 20, generator=torch.Generator().manual_seed(0))
    with ExecuTorchRunner.from_export(result) as runner:
        (out,) = runner.infer({runner.input_metadata()[0].name: x.numpy()}).values()
    with torch.no_grad():
        expected = net(x).numpy()
    error = float(np.abs(out - expected).max())
    assert within_tolerance(error, float(np.abs(expected).max()), rtol=1e-5, atol=1e-6), error
