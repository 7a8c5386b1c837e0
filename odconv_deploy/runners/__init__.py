"""Runners: one contract (activate / infer / deactivate) for every backend."""

from odconv_deploy.runners.base import Runner, RunnerError, TensorMeta
from odconv_deploy.runners.coreml_runner import (
    BackendUnavailableError,
    CoreMLRunner,
    MILReferenceRunner,
    coreml_predict_available,
)
from odconv_deploy.runners.executorch_runner import ExecuTorchRunner
from odconv_deploy.runners.onnxruntime_runner import OnnxRuntimeRunner
from odconv_deploy.runners.torch_runner import TorchRunner

__all__ = [
    "BackendUnavailableError",
    "CoreMLRunner",
    "ExecuTorchRunner",
    "MILReferenceRunner",
    "OnnxRuntimeRunner",
    "Runner",
    "RunnerError",
    "TensorMeta",
    "TorchRunner",
    "coreml_predict_available",
]
