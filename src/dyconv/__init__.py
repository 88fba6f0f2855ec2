"""dyconv: dynamic convolution (Chen et al., CVPR 2020) for PyTorch, exact, drop-in and fast."""

from .attention import ExpertAttention
from .convert import ConversionReport, average_experts, convert, convert_report
from .functional import dynamic_conv
from .layers import DynamicConv1d, DynamicConv2d, DynamicConv3d
from .temperature import TemperatureScheduler, get_temperature, set_temperature

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "DynamicConv1d",
    "DynamicConv2d",
    "DynamicConv3d",
    "ExpertAttention",
    "TemperatureScheduler",
    "average_experts",
    "convert",
    "convert_report",
    "dynamic_conv",
    "get_temperature",
    "set_temperature",
]
