"""odconv-deploy: take ODConv networks from training to phones and edge CPUs.

Main entry points:

- :class:`ODConv2d`: checkpoint-compatible train-time layer.
- :func:`create_model`, :func:`list_models`: the OD-ResNet / OD-MobileNetV2 zoo and twins.
- :func:`load_checkpoint`: load users' checkpoints with readable mismatch errors.
- :func:`reparameterize_model`, :func:`convert_model`: exact conversion to the deploy form.
"""

from odconv_deploy._version import __version__
from odconv_deploy.checkpoint import load_checkpoint
from odconv_deploy.complexity import Complexity, measure_complexity
from odconv_deploy.detect import inspect_odconv, looks_like_odconv
from odconv_deploy.errors import (
    CheckpointError,
    ConversionError,
    InputShapeError,
    MissingBackendError,
    ODConvDeployError,
    UnknownModelError,
    UnsupportedLayerError,
)
from odconv_deploy.io_spec import IOSpec, TensorSpec, image_classifier_spec
from odconv_deploy.layers import (
    DEFAULT_STRATEGY,
    DEPLOY_STRATEGIES,
    LAYER_FORMS,
    DepthwiseTapsODConv2d,
    DynamicLinearODConv2d,
    DynamicWeightODConv2d,
    Im2colODConv2d,
    ODConv2d,
    ODConv2dDeploy,
    OrtNchwcODConv2d,
    StaticWeightODConv2d,
)
from odconv_deploy.layers.spec import ODConvSpec
from odconv_deploy.models import create_model, list_models, model_entry
from odconv_deploy.reparameterize import ConversionResult, convert_model, reparameterize_model
from odconv_deploy.strategy_choice import AUTO_STRATEGY, AUTO_TARGETS, AutoStrategy

__all__ = [
    "AUTO_STRATEGY",
    "AUTO_TARGETS",
    "AutoStrategy",
    "DEFAULT_STRATEGY",
    "DEPLOY_STRATEGIES",
    "LAYER_FORMS",
    "DepthwiseTapsODConv2d",
    "CheckpointError",
    "Complexity",
    "ConversionError",
    "ConversionResult",
    "DynamicLinearODConv2d",
    "DynamicWeightODConv2d",
    "IOSpec",
    "Im2colODConv2d",
    "InputShapeError",
    "MissingBackendError",
    "ODConv2d",
    "ODConv2dDeploy",
    "OrtNchwcODConv2d",
    "ODConvDeployError",
    "ODConvSpec",
    "StaticWeightODConv2d",
    "TensorSpec",
    "UnknownModelError",
    "UnsupportedLayerError",
    "__version__",
    "convert_model",
    "create_model",
    "image_classifier_spec",
    "inspect_odconv",
    "list_models",
    "load_checkpoint",
    "looks_like_odconv",
    "measure_complexity",
    "model_entry",
    "reparameterize_model",
]
