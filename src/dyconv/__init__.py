"""dyconv: dynamic convolution (Chen et al., CVPR 2020) for PyTorch, exact, drop-in and fast."""

from .attention import ExpertAttention
from .convert import ConversionReport, average_experts, convert, convert_report
from .functional import dynamic_conv
from .layers import DynamicConv1d, DynamicConv2d, DynamicConv3d
from .models import create_model, list_models, model_info
from .profile import Profile, profile
from .temperature import TemperatureScheduler, get_temperature, set_temperature

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "DynamicConv1d",
    "DynamicConv2d",
    "DynamicConv3d",
    "ExpertAttention",
    "Profile",
    "TemperatureScheduler",
    "average_experts",
    "convert",
    "convert_report",
    "create_model",
    "dynamic_conv",
    "get_temperature",
    "list_models",
    "model_info",
    "profile",
    "set_temperature",
]
