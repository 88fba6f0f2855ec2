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
#: Keras' padding strings. ``'same'`` follows TensorFlow for strided convolutions (the padding then
#: depends on the input size) and ``'causal'`` (1-D only) pads ``dilation * (kernel_size - 1)`` before.
KERAS_PADDING_STRINGS = ("same", "valid", "causal")

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
    in_channels: int | None  # None until known (a Keras layer learns it in build())
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
        if self.in_channels is None:
            raise ValueError("The attention's hidden width needs in_channels. Received: in_channels=None")
        return attention_hidden(self.in_channels, self.reduction)

    def explicit_padding(self) -> tuple[tuple[int, int], ...]:
        """(before, after) zero-padding per spatial dimension, resolving ``'same'``/``'valid'``.

        ``'same'`` puts the odd extra element after, as PyTorch and TensorFlow do.
        """
        if self.padding == "valid":
            return tuple((0, 0) for _ in range(self.rank))
        if self.padding == "causal":
            return tuple((d * (k - 1), 0) for k, d in zip(self.kernel_size, self.dilation))
        if self.padding == "same":
            pads = []
            for k, d in zip(self.kernel_size, self.dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        return tuple((p, p) for p in self.padding)

    def padding_pairs(self, input_size: Sequence[int | None]) -> tuple[tuple[int, int], ...]:
        """(before, after) zero-padding per spatial dimension for an input of this spatial size.

        Equals :meth:`explicit_padding` except for ``'same'`` with a stride, which follows
        TensorFlow: the output has ``ceil(n / stride)`` elements and the padding, odd element
        after, depends on ``n`` (so ``n`` must be known there).
        """
        pairs = list(self.explicit_padding())
        if self.padding == "same":
            for i, (n, k, s, d) in enumerate(zip(input_size, self.kernel_size, self.stride, self.dilation)):
                if s == 1:
                    continue
                if n is None:
                    raise ValueError(
                        f"padding='same' with strides > 1 needs a known input size in every strided "
                        f"dimension. Received: input spatial size {tuple(input_size)}, strides={self.stride}"
                    )
                total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
                pairs[i] = (total // 2, total - total // 2)
        return tuple(pairs)

    def output_size(self, input_size: Sequence[int | None]) -> tuple[int | None, ...]:
        """Spatial output size for a spatial input size (``None`` stays unknown)."""
        out = []
        for i, (n, k, s, d) in enumerate(zip(input_size, self.kernel_size, self.stride, self.dilation)):
            if n is None:
                out.append(None)
            elif self.padding == "same":
                out.append(-(-n // s))
            else:
                lo, hi = self.explicit_padding()[i]
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
    *,
    keras_padding: bool = False,
    names: dict[str, str] | None = None,
) -> ConvSpec:
    """Validate and normalise the arguments of a ``rank``-D dynamic convolution.

    Raises ``ValueError``/``TypeError`` naming the bad value, e.g.
    ``ValueError: num_experts must be a positive integer. Received: num_experts=0``.

    ``in_channels=None`` defers the channel checks (a Keras layer learns its input channels in
    ``build``). ``keras_padding=True`` accepts Keras' padding strings: ``'same'`` with
    strides (TensorFlow's rule, see :meth:`ConvSpec.padding_pairs`) and ``'causal'`` for 1-D.
    ``names`` renames arguments in the messages, e.g. ``{"stride": "strides"}`` for Keras.
    """
    names = names or {}

    def name(key: str) -> str:
        return names.get(key, key)

    if rank not in (1, 2, 3):
        raise ValueError(f"rank must be 1, 2 or 3. Received: rank={rank!r}")
    if in_channels is not None:
        in_channels = positive_int(in_channels, name("in_channels"))
    out_channels = positive_int(out_channels, name("out_channels"))
    groups = positive_int(groups, "groups")
    if in_channels is not None and in_channels % groups:
        raise ValueError(
            f"{name('in_channels')} must be divisible by groups. "
            f"Received: {name('in_channels')}={in_channels}, groups={groups}"
        )
    if out_channels % groups:
        raise ValueError(
            f"{name('out_channels')} must be divisible by groups. "
            f"Received: {name('out_channels')}={out_channels}, groups={groups}"
        )
    kernel_size = to_tuple(kernel_size, rank, "kernel_size", minimum=1)
    stride = to_tuple(stride, rank, name("stride"), minimum=1)
    dilation = to_tuple(dilation, rank, name("dilation"), minimum=1)
    padding_strings = KERAS_PADDING_STRINGS if keras_padding else PADDING_STRINGS
    if isinstance(padding, str):
        if padding not in padding_strings:
            choices = ", ".join(repr(p) for p in padding_strings)
            raise ValueError(f"padding must be {choices}, an int or a tuple. Received: padding={padding!r}")
        if padding == "same" and not keras_padding and any(s != 1 for s in stride):
            raise ValueError(
                f"padding='same' is not supported for strided convolutions. Received: stride={stride}"
            )
        if padding == "causal" and rank != 1:
            raise ValueError(f"padding='causal' is only defined for 1-D convolutions. Received: rank={rank}")
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
