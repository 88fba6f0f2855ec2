"""Building blocks shared by the model files: conv-norm-activation, channel rounding, the conv layer choice, init."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from .. import _args
from ..layers import DYNAMIC_CONV_TYPES, DynamicConv1d, DynamicConv2d, DynamicConv3d

ConvLayer = Callable[..., nn.Module]

_DYNAMIC_BY_RANK = {1: DynamicConv1d, 2: DynamicConv2d, 3: DynamicConv3d}


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """``value`` rounded to the nearest multiple of ``divisor``, never more than 10 % below ``value``.

    The channel rounding of the MobileNet papers (and torchvision), so width multipliers give the
    standard architectures: ``make_divisible(32 * 0.35) == 16``.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def dynamic_conv_layer(rank: int, *, num_experts: int = 4, reduction: int = 4, temperature: float = 30.0) -> ConvLayer:
    """The ``conv_layer`` a model gets to become dynamic: ``DynamicConv{rank}d`` with these options bound.

    Example:
        >>> conv = dynamic_conv_layer(2, num_experts=4)
        >>> conv(16, 32, 3, padding=1, bias=False).weight.shape
        torch.Size([4, 32, 16, 3, 3])
    """
    # Validate here so a bad option fails before any layer is built, with the layers' own messages.
    _args.positive_int(num_experts, "num_experts")
    _args.positive_int(reduction, "reduction")
    _args.positive_float(temperature, "temperature")
    return functools.partial(_DYNAMIC_BY_RANK[rank], num_experts=num_experts, reduction=reduction,
                             temperature=temperature)


class ConvNormAct(nn.Sequential):
    """Convolution → normalisation → activation, as one ``nn.Sequential`` (indices 0, 1, 2).

    The layout and indices are torchvision's ``Conv2dNormActivation``'s, so the state-dict keys of the static
    models are torchvision's. The convolution has no bias when a normalisation follows it. Padding is
    ``(kernel_size - 1) // 2 * dilation`` ("same" for odd kernels at stride 1).

    Args:
        conv_layer: the convolution class (``nn.Conv2d`` or a dynamic one, see :func:`dynamic_conv_layer`).
        norm_layer: normalisation class or ``None``.
        activation: activation class or ``None`` (then the block is conv → norm).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 dilation: int = 1, *, conv_layer: ConvLayer = nn.Conv2d,
                 norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
                 activation: Callable[..., nn.Module] | None = nn.ReLU):
        padding = (kernel_size - 1) // 2 * dilation
        layers = [conv_layer(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                             bias=norm_layer is None)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


def init_weights(model: nn.Module, *, linear_std: float | None = 0.01) -> None:
    """torchvision's initialisation, applied alike to static and dynamic convolutions.

    Convolutions: Kaiming normal (fan-out, ReLU gain), for a dynamic layer each of the K kernels independently;
    biases zero. Norm layers: weight 1, bias 0. ``nn.Linear`` outside the dynamic layers: normal with
    ``linear_std`` and zero bias (``None`` keeps PyTorch's default, as torchvision's ResNet does). The
    dynamic layers' attention branches keep their own initialisation.
    """
    routers = {id(m) for layer in model.modules() if isinstance(layer, DYNAMIC_CONV_TYPES) for m in layer.modules()}
    for module in model.modules():
        if isinstance(module, DYNAMIC_CONV_TYPES):
            for k in range(module.num_experts):
                nn.init.kaiming_normal_(module.weight[k], mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and id(module) not in routers and linear_std is not None:
            nn.init.normal_(module.weight, 0, linear_std)
            nn.init.zeros_(module.bias)
