"""Keras 3 dynamic convolution layers (torch, jax and tensorflow backends).

Imported explicitly (``import dyconv.keras``); ``import dyconv`` does not import Keras.
"""

from .layers import DYNAMIC_CONV_TYPES, DynamicConv1D, DynamicConv2D, DynamicConv3D
from .temperature import TemperatureScheduler, dynamic_layers, get_temperature, set_temperature
from .transfer import export_torch_weights, from_torch, load_torch_weights, to_torch

__all__ = [
    "DYNAMIC_CONV_TYPES",
    "DynamicConv1D",
    "DynamicConv2D",
    "DynamicConv3D",
    "TemperatureScheduler",
    "dynamic_layers",
    "export_torch_weights",
    "from_torch",
    "get_temperature",
    "load_torch_weights",
    "set_temperature",
    "to_torch",
]
