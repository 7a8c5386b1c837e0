"""ODConv layers: the checkpoint-compatible train form and the export-friendly deploy forms."""

from odconv_deploy.layers.deploy import (
    DEFAULT_STRATEGY,
    DEPLOY_STRATEGIES,
    DepthwiseTapsODConv2d,
    DynamicLinearODConv2d,
    DynamicWeightODConv2d,
    Im2colODConv2d,
    ODConv2dDeploy,
    StaticWeightODConv2d,
)
from odconv_deploy.layers.odconv import Attentions, ODAttention, ODConv2d
from odconv_deploy.layers.ort_nchwc import OrtNchwcODConv2d

#: Every deploy form, including those for some kinds of layer only (chosen per layer by
#: ``strategy="auto"``).
LAYER_FORMS: dict[str, type[ODConv2dDeploy]] = {
    **DEPLOY_STRATEGIES,
    DepthwiseTapsODConv2d.form: DepthwiseTapsODConv2d,
    DynamicLinearODConv2d.form: DynamicLinearODConv2d,
    OrtNchwcODConv2d.form: OrtNchwcODConv2d,
}

__all__ = [
    "DEFAULT_STRATEGY",
    "DEPLOY_STRATEGIES",
    "LAYER_FORMS",
    "DepthwiseTapsODConv2d",
    "Attentions",
    "DynamicLinearODConv2d",
    "DynamicWeightODConv2d",
    "Im2colODConv2d",
    "ODAttention",
    "ODConv2d",
    "ODConv2dDeploy",
    "OrtNchwcODConv2d",
    "StaticWeightODConv2d",
]
