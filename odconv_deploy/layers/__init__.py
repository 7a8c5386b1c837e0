"""ODConv layers: the checkpoint-compatible train form and the export-friendly deploy forms."""

from odconv_deploy.layers.deploy import (
    DEFAULT_STRATEGY,
    DEPLOY_STRATEGIES,
    LAYER_FORMS,
    DepthwiseTapsODConv2d,
    DynamicWeightODConv2d,
    Im2colODConv2d,
    ODConv2dDeploy,
    StaticWeightODConv2d,
)
from odconv_deploy.layers.odconv import Attentions, ODAttention, ODConv2d

__all__ = [
    "DEFAULT_STRATEGY",
    "DEPLOY_STRATEGIES",
    "LAYER_FORMS",
    "DepthwiseTapsODConv2d",
    "Attentions",
    "DynamicWeightODConv2d",
    "Im2colODConv2d",
    "ODAttention",
    "ODConv2d",
    "ODConv2dDeploy",
    "StaticWeightODConv2d",
]
