"""Weight transfer between the PyTorch layers (``dyconv.DynamicConv1d/2d/3d``) and the Keras layers.

``from_torch(torch_layer)`` returns a built Keras layer with the same configuration and weights;
``to_torch(keras_layer)`` the reverse. With the same weights both compute the same function (the
Keras layer on ``channels_last`` input gives the PyTorch output with the channels moved last).

Layouts:

=====================  ====================================  ====================================
weight                 PyTorch                               Keras
=====================  ====================================  ====================================
kernels                ``weight (K, C_out, C_in/g, *k)``     ``kernel (K, *k, C_in/g, filters)``
biases                 ``bias (K, C_out)``                   ``bias (K, filters)``
attention hidden       ``router.fc1`` (``Linear``)           ``attention_hidden`` (``Dense``)
attention logits       ``router.fc2`` (``Linear``)           ``attention_logits`` (``Dense``)
temperature            buffer                                non-trainable variable
=====================  ====================================  ====================================
"""

from __future__ import annotations

import keras
import numpy as np
import torch

from .. import layers as torch_layers
from .layers import DynamicConv1D, DynamicConv2D, DynamicConv3D

_KERAS_TYPES = {1: DynamicConv1D, 2: DynamicConv2D, 3: DynamicConv3D}
_TORCH_TYPES = {1: torch_layers.DynamicConv1d, 2: torch_layers.DynamicConv2d, 3: torch_layers.DynamicConv3d}


def _numpy(variable) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable.value if hasattr(variable, "value") else variable))


def _kernel_to_keras(weight: np.ndarray) -> np.ndarray:
    rank = weight.ndim - 3
    return np.transpose(weight, (0, *range(3, 3 + rank), 2, 1))


def _kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    rank = kernel.ndim - 3
    return np.transpose(kernel, (0, rank + 2, rank + 1, *range(1, rank + 1)))


def from_torch(torch_layer, data_format: str | None = None, **kwargs):
    """A built Keras ``DynamicConvND`` with ``torch_layer``'s configuration, weights and temperature.

    Args:
        torch_layer: a :class:`dyconv.DynamicConv1d/2d/3d` with ``padding_mode='zeros'``.
        data_format: the Keras layer's data format (default ``keras.config.image_data_format()``).
        **kwargs: further Keras layer arguments (``activation``, ``name``, regularizers, ...).

    Example:
        >>> keras_layer = from_torch(dyconv.DynamicConv2d(8, 16, 3, padding=1))
        >>> keras_layer.kernel.shape
        (4, 3, 3, 8, 16)
    """
    if not isinstance(torch_layer, torch_layers.DYNAMIC_CONV_TYPES):
        raise TypeError(
            f"from_torch expects a dyconv.DynamicConv1d/2d/3d. Received: {type(torch_layer).__name__}"
        )
    if torch_layer.padding_mode != "zeros":
        raise ValueError(
            "Keras layers pad with zeros only. Received: padding_mode=" f"{torch_layer.padding_mode!r}"
        )
    rank = torch_layer._rank
    padding = torch_layer.padding
    if not isinstance(padding, str) and not any(padding):
        padding = "valid"
    layer = _KERAS_TYPES[rank](
        torch_layer.out_channels, torch_layer.kernel_size, torch_layer.num_experts, strides=tuple(torch_layer.stride),
        padding=padding, data_format=data_format, dilation_rate=tuple(torch_layer.dilation),
        use_bias=torch_layer.bias is not None, groups=torch_layer.groups, reduction=torch_layer.reduction,
        temperature=float(torch_layer.temperature), **kwargs,
    )
    shape = [None] * (rank + 2)
    shape[-1 if layer.data_format == "channels_last" else 1] = torch_layer.in_channels
    layer.build(tuple(shape))
    load_torch_weights(layer, torch_layer)
    return layer


def load_torch_weights(keras_layer, torch_layer) -> None:
    """Copy ``torch_layer``'s weights and temperature into the built ``keras_layer`` (same configuration)."""
    state = {k: v.detach().cpu().numpy() for k, v in torch_layer.state_dict().items()}
    expected = _kernel_to_keras(state["weight"]).shape
    if tuple(keras_layer.kernel.shape) != expected:
        raise ValueError(
            f"The layers' kernels do not match: the PyTorch kernel gives Keras shape {expected}. "
            f"Received: keras kernel shape {tuple(keras_layer.kernel.shape)}"
        )
    if (keras_layer.bias is None) != ("bias" not in state):
        raise ValueError(f"Both layers must have biases or neither. Received: use_bias={keras_layer.use_bias}")
    keras_layer.kernel.assign(_kernel_to_keras(state["weight"]))
    if keras_layer.bias is not None:
        keras_layer.bias.assign(state["bias"])
    keras_layer.attention_hidden.kernel.assign(state["router.fc1.weight"].T)
    keras_layer.attention_hidden.bias.assign(state["router.fc1.bias"])
    keras_layer.attention_logits.kernel.assign(state["router.fc2.weight"].T)
    keras_layer.attention_logits.bias.assign(state["router.fc2.bias"])
    keras_layer.temperature.assign(float(state["temperature"]))


def to_torch(keras_layer):
    """A :class:`dyconv.DynamicConv1d/2d/3d` with the built ``keras_layer``'s configuration and weights.

    Not every Keras configuration exists in PyTorch: an activation, ``padding='causal'`` and
    ``padding='same'`` with strides (TensorFlow's input-dependent padding) raise ``ValueError``.

    Example:
        >>> keras_layer = DynamicConv2D(16, 3, padding="same")
        >>> keras_layer.build((None, 28, 28, 8))
        >>> to_torch(keras_layer).weight.shape
        torch.Size([4, 16, 8, 3, 3])
    """
    if not isinstance(keras_layer, tuple(_KERAS_TYPES.values())):
        raise TypeError(
            f"to_torch expects a dyconv.keras.DynamicConv1D/2D/3D. Received: {type(keras_layer).__name__}"
        )
    if not keras_layer.built:
        raise ValueError(f"to_torch needs a built layer (call it once). Received: built={keras_layer.built}")
    activation = getattr(keras_layer.activation, "__name__", str(keras_layer.activation))
    if keras_layer.activation is not None and activation != "linear":
        raise ValueError(
            "The PyTorch layer has no activation; apply it after the layer. "
            f"Received: activation={activation!r}"
        )
    padding = keras_layer.padding
    if padding == "causal" or (padding == "same" and any(s != 1 for s in keras_layer.strides)):
        raise ValueError(
            "The PyTorch layer cannot express this padding (causal, or 'same' with strides). "
            f"Received: padding={padding!r}, strides={keras_layer.strides}"
        )
    spec = keras_layer.spec
    torch_layer = _TORCH_TYPES[keras_layer.rank](
        spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride, 0 if padding == "valid" else padding,
        spec.dilation, spec.groups, keras_layer.use_bias, num_experts=spec.num_experts,
        reduction=spec.reduction, temperature=float(_numpy(keras_layer.temperature)),
    )
    export_torch_weights(keras_layer, torch_layer)
    return torch_layer


def export_torch_weights(keras_layer, torch_layer) -> None:
    """Copy the built ``keras_layer``'s weights and temperature into ``torch_layer`` (same configuration)."""
    state = {
        "weight": _kernel_to_torch(_numpy(keras_layer.kernel)),
        "router.fc1.weight": _numpy(keras_layer.attention_hidden.kernel).T,
        "router.fc1.bias": _numpy(keras_layer.attention_hidden.bias),
        "router.fc2.weight": _numpy(keras_layer.attention_logits.kernel).T,
        "router.fc2.bias": _numpy(keras_layer.attention_logits.bias),
        "temperature": _numpy(keras_layer.temperature),
    }
    if keras_layer.bias is not None:
        state["bias"] = _numpy(keras_layer.bias)
    reference = torch_layer.state_dict()
    tensors = {}
    for key, value in state.items():
        if key not in reference or tuple(reference[key].shape) != value.shape:
            raise ValueError(
                f"The layers do not match at {key!r}: Keras gives shape {value.shape}. "
                f"Received: PyTorch shape {tuple(reference[key].shape) if key in reference else None}"
            )
        tensors[key] = torch.as_tensor(np.ascontiguousarray(value), dtype=reference[key].dtype)
    missing = set(reference) - set(tensors)
    if missing:
        raise ValueError(f"Both layers must have biases or neither. Received: use_bias={keras_layer.use_bias}")
    torch_layer.load_state_dict(tensors)
