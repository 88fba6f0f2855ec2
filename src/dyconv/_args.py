"""Framework-free argument normalisation and validation for the dynamic convolution layers.

The PyTorch layers (:mod:`dyconv.layers`) and the Keras layers (:mod:`dyconv.keras`) are thin
adapters over this module, so both accept the same values and reject bad ones with the same
messages. Nothing here imports a deep-learning framework.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PADDING_STRINGS = ("same", "valid")

#: Smallest hidden width of the attention branch. ``in_channels // reduction`` is 0 for an RGB
#: stem (3 // 4); a two-layer attention needs a few hidden units to be more than a constant.
MIN_ATTENTION_HIDDEN = 4


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def to_tuple(value, rank: int, name: str, *, minimum: int | None = None) -> tuple[int, ...]:
    """``value`` as a tuple of ``rank`` ints: an int is repeated, a sequence must have ``rank`` items.

    >>> to_tuple(3, 2, "kernel_size")
    (3, 3)
    """
    if _is_int(value):
        items = (int(value),) * rank
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = tuple(value)
        if len(items) != rank or not all(_is_int(v) for v in items):
            raise ValueError(
                f"{name} must be an int or a sequence of {rank} ints for a {rank}-D convolution. "
                f"Received: {name}={value!r}"
            )
        items = tuple(int(v) for v in items)
    else:
        raise TypeError(f"{name} must be an int or a sequence of {rank} ints. Received: {name}={value!r}")
    if minimum is not None and any(v < minimum for v in items):
        raise ValueError(f"{name} must be >= {minimum} in every dimension. Received: {name}={value!r}")
    return items


def positive_int(value, name: str) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int. Received: {name}={value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
    return int(value)


def positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number. Received: {name}={value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number. Received: {name}={value!r}")
    return value


def attention_hidden(in_channels: int, reduction: int) -> int:
    """Hidden width of the attention branch: ``max(in_channels // reduction, MIN_ATTENTION_HIDDEN)``."""
    return max(in_channels // reduction, MIN_ATTENTION_HIDDEN)


@dataclass(frozen=True)
class ConvSpec:
    """Validated, normalised arguments of one dynamic convolution layer."""

    rank: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    num_experts: int
    reduction: int
    temperature: float

    @property
    def hidden(self) -> int:
        return attention_hidden(self.in_channels, self.reduction)

    def explicit_padding(self) -> tuple[tuple[int, int], ...]:
        """(before, after) zero-padding per spatial dimension, resolving ``'same'``/``'valid'``.

        ``'same'`` puts the odd extra element after, as PyTorch and TensorFlow do.
        """
        if self.padding == "valid":
            return tuple((0, 0) for _ in range(self.rank))
        if self.padding == "same":
            pads = []
            for k, d in zip(self.kernel_size, self.dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        return tuple((p, p) for p in self.padding)

    def output_size(self, input_size: Sequence[int | None]) -> tuple[int | None, ...]:
        """Spatial output size for a spatial input size (``None`` stays unknown)."""
        out = []
        for n, (lo, hi), k, s, d in zip(
            input_size, self.explicit_padding(), self.kernel_size, self.stride, self.dilation
        ):
            if n is None:
                out.append(None)
            else:
                out.append((n + lo + hi - d * (k - 1) - 1) // s + 1)
        return tuple(out)


def conv_spec(
    rank: int,
    in_channels,
    out_channels,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
    num_experts=4,
    reduction=4,
    temperature=30.0,
) -> ConvSpec:
    """Validate and normalise the arguments of a ``rank``-D dynamic convolution.

    Raises ``ValueError``/``TypeError`` naming the bad value, e.g.
    ``ValueError: num_experts must be a positive integer. Received: num_experts=0``.
    """
    if rank not in (1, 2, 3):
        raise ValueError(f"rank must be 1, 2 or 3. Received: rank={rank!r}")
    in_channels = positive_int(in_channels, "in_channels")
    out_channels = positive_int(out_channels, "out_channels")
    groups = positive_int(groups, "groups")
    if in_channels % groups:
        raise ValueError(
            f"in_channels must be divisible by groups. Received: in_channels={in_channels}, groups={groups}"
        )
    if out_channels % groups:
        raise ValueError(
            f"out_channels must be divisible by groups. Received: out_channels={out_channels}, groups={groups}"
        )
    kernel_size = to_tuple(kernel_size, rank, "kernel_size", minimum=1)
    stride = to_tuple(stride, rank, "stride", minimum=1)
    dilation = to_tuple(dilation, rank, "dilation", minimum=1)
    if isinstance(padding, str):
        if padding not in PADDING_STRINGS:
            raise ValueError(f"padding must be 'same', 'valid', an int or a tuple. Received: padding={padding!r}")
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError(
                f"padding='same' is not supported for strided convolutions. Received: stride={stride}"
            )
    else:
        padding = to_tuple(padding, rank, "padding", minimum=0)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}. Received: padding_mode={padding_mode!r}")
    num_experts = positive_int(num_experts, "num_experts")
    reduction = positive_int(reduction, "reduction")
    temperature = positive_float(temperature, "temperature")
    return ConvSpec(
        rank, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
        padding_mode, num_experts, reduction, temperature,
    )
