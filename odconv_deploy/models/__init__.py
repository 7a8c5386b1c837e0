"""The model zoo: OD-ResNet, OD-MobileNetV2 and their static twins."""

from odconv_deploy.models._registry import ModelEntry, create_model, list_models, model_entry
from odconv_deploy.models.mobilenetv2 import MobileNetV2
from odconv_deploy.models.resnet import ResNet

__all__ = ["MobileNetV2", "ModelEntry", "ResNet", "create_model", "list_models", "model_entry"]
