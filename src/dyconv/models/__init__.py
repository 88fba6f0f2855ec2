"""The paper's networks and their static twins, behind a registry: ``create_model(name)``, ``list_models()``.

Each architecture is one code path taking the convolution class as an argument (``conv_layer=``); the
``dy_`` builders pass a dynamic convolution for the layers the paper makes dynamic.
"""

from . import cnn1d, mobilenetv2, mobilenetv3, resnet  # noqa: F401  (importing registers the builders)
from ._blocks import ConvNormAct, dynamic_conv_layer, make_divisible
from ._registry import ModelInfo, PaperFigures, create_model, list_models, model_info, register_model
from ._table import ModelRow, format_table, model_table
from .cnn1d import CNN1d
from .mobilenetv2 import MobileNetV2
from .mobilenetv3 import MobileNetV3
from .resnet import ResNet

__all__ = [
    "CNN1d",
    "ConvNormAct",
    "MobileNetV2",
    "MobileNetV3",
    "ModelInfo",
    "ModelRow",
    "PaperFigures",
    "ResNet",
    "create_model",
    "dynamic_conv_layer",
    "format_table",
    "list_models",
    "make_divisible",
    "model_info",
    "model_table",
    "register_model",
]
