"""Per-sample convolution in ``keras.ops``: every sample convolved with its own mixture of K kernels.

``dynamic_conv(x, kernel, bias, attention, ...)`` computes, for each sample ``b``,

    out[b] = conv(x[b], sum_k attention[b, k] * kernel[k]) + sum_k attention[b, k] * bias[k]

for 1-, 2- and 3-D inputs on every Keras backend, with the FLOPs of one convolution (not K).

How: the K kernels are mixed per sample (a ``(B, K) @ (K, kernel size)`` product, the paper's
aggregation), then the convolution is written as a sum over the kernel positions: for each
position, a strided slice of the padded input (the input elements that position meets) times
that position's per-sample ``(C_in / groups, filters / groups)`` matrix, one batched matrix
product. Nothing in the graph depends on the batch size, so it runs with an unknown batch
under ``tf.function`` and XLA. Grouped and depthwise convolutions use the same sum (depthwise:
a broadcast product instead of a matrix product), so their cost is that of the convolution too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from keras import ops


def mix_experts(attention, kernel, bias=None):
    """Per-sample kernels ``(B, *kernel.shape[1:])`` and biases ``(B, filters)`` (or ``None``).

    ``attention``: ``(B, K)``; ``kernel``: ``(K, ...)``; ``bias``: ``(K, filters)`` or ``None``.
    """
    num_experts = kernel.shape[0]
    mixed = ops.matmul(attention, ops.reshape(kernel, (num_experts, -1)))
    mixed = ops.reshape(mixed, (_known(ops.shape(mixed)[:1]), *kernel.shape[1:]))
    mixed_bias = None if bias is None else ops.matmul(attention, bias)
    return mixed, mixed_bias


def _window(x, start: Sequence[int], last: Sequence[int], strides: Sequence[int], spatial_axis: int):
    """``x`` sliced in each spatial dimension ``i`` from ``start[i]`` to ``last[i]`` before the end, by ``strides[i]``.

    The stop is counted from the end so the slice works for an unknown spatial size.
    """
    index = [slice(None)] * len(x.shape)
    for i, (a, b, s) in enumerate(zip(start, last, strides)):
        index[spatial_axis + i] = slice(a, -b if b else None, s)
    return x[tuple(index)]


def dynamic_conv(x, kernel, bias, attention, strides, padding, dilation_rate, groups: int,
                 data_format: str = "channels_last"):
    """Convolve every sample of ``x`` with its own attention-weighted mixture of the K kernels.

    Args:
        x: ``(B, *spatial, C_in)`` (``channels_last``) or ``(B, C_in, *spatial)`` (``channels_first``).
        kernel: ``(K, *kernel_size, C_in // groups, filters)``.
        bias: ``(K, filters)`` or ``None``.
        attention: ``(B, K)`` mixing weights.
        strides, dilation_rate: one int per spatial dimension.
        padding: ``(before, after)`` zero padding per spatial dimension.
        groups: number of groups (``C_in`` for depthwise).
        data_format: ``'channels_last'`` or ``'channels_first'``.

    Returns:
        ``(B, *out_spatial, filters)`` or ``(B, filters, *out_spatial)``.

    Example:
        >>> x = keras.random.normal((2, 9, 9, 4))
        >>> kernel, bias = keras.random.normal((3, 3, 3, 4, 8)), keras.random.normal((3, 8))
        >>> dynamic_conv(x, kernel, bias, ops.ones((2, 3)) / 3, (1, 1), ((1, 1), (1, 1)), (1, 1), 1).shape
        (2, 9, 9, 8)
    """
    rank = len(kernel.shape) - 3
    kernel_size = tuple(kernel.shape[1 : 1 + rank])
    group_in, filters = kernel.shape[-2], kernel.shape[-1]
    group_out = filters // groups
    channels_last = data_format == "channels_last"
    spatial_axis = 1 if channels_last else 2

    mixed, mixed_bias = mix_experts(attention, kernel, bias)
    positions = math.prod(kernel_size)
    # (B, positions, C_in/g, filters) -> per position (B, g, C_in/g, filters/g) [or its transpose]
    mixed = ops.reshape(mixed, (_known(ops.shape(mixed)[:1]), positions, group_in, groups, group_out))
    mixed = ops.transpose(mixed, (0, 1, 3, 2, 4) if channels_last else (0, 1, 3, 4, 2))

    if any(lo or hi for lo, hi in padding):
        pad = [(0, 0)] * (rank + 2)
        pad[spatial_axis : spatial_axis + rank] = [tuple(p) for p in padding]
        x = ops.pad(x, pad)
    batch = ops.shape(x)[0]

    out = None
    for p, offset in enumerate(_positions(kernel_size)):
        start = [o * d for o, d in zip(offset, dilation_rate)]
        last = [(k - 1 - o) * d for k, o, d in zip(kernel_size, offset, dilation_rate)]
        window = _window(x, start, last, strides, spatial_axis)
        window_positions = _known(ops.shape(window)[spatial_axis : spatial_axis + rank])
        term = _contract(window, mixed[:, p], batch, groups, group_in, channels_last, window_positions)
        out = term if out is None else out + term

    out_spatial = ops.shape(window)[spatial_axis : spatial_axis + rank]
    if mixed_bias is not None:
        out = out + (ops.expand_dims(mixed_bias, 1) if channels_last else ops.expand_dims(mixed_bias, -1))
    if channels_last:
        return ops.reshape(out, (batch, *out_spatial, filters))
    return ops.reshape(out, (batch, filters, *out_spatial))


def _positions(kernel_size):
    """Every kernel position (a tuple of offsets), in the row-major order of the kernel's layout."""
    grids = [()]
    for k in kernel_size:
        grids = [g + (i,) for g in grids for i in range(k)]
    return grids


def _known(sizes):
    """The product of ``sizes`` where every one is a known int, else -1 (for a reshape: an unknown spatial size in
    a symbolic graph). Known sizes keep the reshapes valid for an empty batch, where -1 is ambiguous."""
    total = 1
    for size in sizes:
        if not isinstance(size, int):
            return -1
        total *= size
    return total


def _contract(window, weight, batch, groups: int, group_in: int, channels_last: bool, positions=-1):
    """One kernel position's contribution, spatial positions flattened (``positions``: their number, -1 if
    unknown).

    channels_last: window ``(B, *out, C_in)``, weight ``(B, g, C_in/g, filters/g)`` → ``(B, P, filters)``.
    channels_first: window ``(B, C_in, *out)``, weight ``(B, g, filters/g, C_in/g)`` → ``(B, filters, P)``.
    """
    channels = groups * group_in
    if channels_last:
        rows = ops.reshape(window, (batch, positions, channels))  # (B, P, C_in)
        if groups == 1:
            return ops.matmul(rows, weight[:, 0])
        rows = ops.reshape(rows, (batch, positions, groups, group_in))
        if group_in == 1:  # depthwise: a broadcast product, no contraction
            out = rows * ops.expand_dims(weight[:, :, 0], 1)
        else:
            out = ops.einsum("bpgi,bgio->bpgo", rows, weight)
        return ops.reshape(out, (batch, positions, groups * weight.shape[-1]))
    cols = ops.reshape(window, (batch, groups, group_in, positions))  # (B, g, C_in/g, P)
    if group_in == 1:
        out = weight * cols  # (B, g, filters/g, 1) * (B, g, 1, P)
    else:
        out = ops.matmul(weight, cols)
    return ops.reshape(out, (batch, groups * weight.shape[2], positions))
