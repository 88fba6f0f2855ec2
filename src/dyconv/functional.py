"""Per-sample convolution: every sample of a batch convolved with its own mixture of K kernels.

``dynamic_conv(x, weight, bias, attention, ...)`` computes, for each sample ``b``,

    out[b] = conv(x[b], sum_k attention[b, k] * weight[k]) + sum_k attention[b, k] * bias[k]

for 1-, 2- and 3-D inputs. Several exact strategies compute it; :func:`select_strategy` picks one
from the shapes, and while tracing, exporting or compiling it picks one whose graph does not
depend on the batch size. Everything here is TorchScript-compatible.

Strategies (all give the same numbers up to floating-point rounding):

``"groups"``
    Mix the kernels per sample, fold the batch into the convolution's groups, one convolution.
``"loop"``
    Mix the kernels per sample, one dense convolution per sample (aggregate-then-convolve).
``"matmul"``
    1×1 kernels only: one batched matrix product per group.
``"unfold"``
    Extract patches with a fixed one-hot convolution, then one batched matrix product per group.
    The graph has no batch-size constant, so it exports with a dynamic batch axis.
``"experts"``
    Convolve with all K kernels at once, then mix the K outputs (K× the FLOPs; cheap for
    depthwise layers). Also free of batch-size constants.
``"unfold_experts"``
    Patches as in ``"unfold"``, then all K kernels in one matrix product, outputs mixed per sample (K× the
    FLOPs as matrix products; for tiny outputs, where the convolution's own kernels are slow).
``"scaled_inputs"``
    The input repeated K times, each copy scaled by its expert's attention, then one convolution with the K
    kernels side by side along the input channels (K× the FLOPs, like ``"experts"``, but K copies of the input
    instead of K outputs: cheaper where a layer has more output than input channels).
``"chunked"``
    Batch-as-groups over chunks of the batch whose mixed kernels fit a fixed budget (a batched matrix
    product for unpadded stride-1 1×1 kernels). With gradients, a custom autograd function recomputes the
    mixed kernels in backward instead of keeping them, so training memory does not grow with
    ``batch × kernel size`` per layer (see :mod:`dyconv._chunked`). The default in eager mode.
``"depthwise_kernel"``
    Depthwise layers on the CPU with channels_last input (float32, float64): a compiled kernel that mixes each
    sample's kernel and convolves in one pass, with its own backward (see :mod:`dyconv._cpu_kernel`). The default
    for such layers in eager mode where the kernel could be built.
``"dense_kernel"``
    Ungrouped stride-1 layers on the CPU (float32, float64): a compiled kernel that mixes each sample's kernel
    inside the convolution's tiles, never writing it whole, and a backward that does the same for the input gradient
    and folds each sample's kernel gradient into the experts' tile by tile (see :mod:`dyconv._cpu_kernel`). The
    default in eager mode for kernels larger than 1×1 with small outputs, and for 1×1 kernels with smaller outputs
    from batch 8 on (with gradients: at batch > 1).

Only ``"chunked"``, ``"depthwise_kernel"`` and ``"dense_kernel"`` bound training memory; the other strategies leave
backward to autograd, which keeps every sample's mixed kernel until backward.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _chunked, _cpu_kernel
from ._cpu_kernel import conv_dense_kernel, conv_depthwise_kernel
from ._chunked import (conv_chunked, is_channels_last, kernel_is_one, output_positions, product,
                       tracing_exporting_or_compiling, uses_matmul)

STRATEGIES = ("groups", "loop", "matmul", "unfold", "experts", "unfold_experts", "scaled_inputs", "chunked",
              "depthwise_kernel", "dense_kernel")
# Strategies whose graphs hold no batch-size constant (used for export, tracing and compile).
BATCH_GENERIC_STRATEGIES = ("matmul", "unfold", "experts")


def conv(x: Tensor, w: Tensor, b: Optional[Tensor], stride: List[int], padding: List[int],
         dilation: List[int], groups: int) -> Tensor:
    """``F.conv1d/2d/3d`` by the input's rank."""
    rank = x.dim() - 2
    if rank == 1:
        return F.conv1d(x, w, b, stride, padding, dilation, groups)
    if rank == 2:
        return F.conv2d(x, w, b, stride, padding, dilation, groups)
    return F.conv3d(x, w, b, stride, padding, dilation, groups)


def channels_first(t: Tensor, out_size: List[int]) -> Tensor:
    """``t``, whose memory holds ``(B, *out_size, ...)`` with the channels last, as ``(B, C, *out_size)``: a view,
    channels_last for 2-D and 3-D outputs."""
    t = t.reshape([t.shape[0]] + out_size + [-1])
    return t.permute([0, t.dim() - 1] + list(range(1, t.dim() - 1)))


def _subsample(x: Tensor, stride: List[int]) -> Tensor:
    rank = x.dim() - 2
    if rank == 1:
        return x[:, :, :: stride[0]]
    if rank == 2:
        return x[:, :, :: stride[0], :: stride[1]]
    return x[:, :, :: stride[0], :: stride[1], :: stride[2]]


def apply_padding(x: Tensor, padding: List[int], padding_mode: str) -> tuple[Tensor, List[int]]:
    """Pad ``x`` where a convolution cannot, returning the input and the padding left for the conv.

    ``padding`` holds (before, after) per spatial dimension, flattened in dimension order.
    Symmetric zero padding is left to the convolution; anything else is applied with ``F.pad``.
    """
    rank = x.dim() - 2
    before = [padding[2 * i] for i in range(rank)]
    after = [padding[2 * i + 1] for i in range(rank)]
    if padding_mode == "zeros" and before == after:
        return x, before
    pad: List[int] = []
    for i in range(rank - 1, -1, -1):  # F.pad wants the last dimension first
        pad.append(before[i])
        pad.append(after[i])
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return F.pad(x, pad, mode=mode), [0] * rank


def mix_experts(attention: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Per-sample kernels ``(B, *weight.shape[1:])`` and biases ``(B, out_channels)``."""
    num_experts = weight.shape[0]
    mixed = torch.mm(attention.to(weight.dtype), weight.reshape(num_experts, -1))
    mixed = mixed.reshape([attention.shape[0]] + list(weight.shape[1:]))
    return mixed, mix_bias(attention, bias)


def mix_bias(attention: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """Per-sample biases ``(B, out_channels)`` (``None`` without a bias)."""
    if bias is None:
        return None
    return torch.mm(attention.to(bias.dtype), bias)


def _add_bias(out: Tensor, mixed_bias: Optional[Tensor]) -> Tensor:
    if mixed_bias is None:
        return out
    shape = [mixed_bias.shape[0], mixed_bias.shape[1]] + [1] * (out.dim() - 2)
    return out + mixed_bias.reshape(shape).to(out.dtype)


def conv_groups(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                padding: List[int], dilation: List[int], groups: int) -> Tensor:
    """Batch folded into the convolution's groups: ``groups = batch * groups``."""
    batch = x.shape[0]
    mixed, mixed_bias = mix_experts(attention, weight, bias)
    w = mixed.reshape([batch * weight.shape[1]] + list(weight.shape[2:]))
    b: Optional[Tensor] = None
    if mixed_bias is not None:
        b = mixed_bias.reshape(-1)
    # reshape, not view: channels_last and other non-contiguous inputs must work
    out = conv(x.reshape([1, -1] + list(x.shape[2:])), w, b, stride, padding, dilation, batch * groups)
    return out.reshape([batch, weight.shape[1]] + list(out.shape[2:]))


def conv_loop(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
              padding: List[int], dilation: List[int], groups: int) -> Tensor:
    """One dense convolution per sample with its mixed kernel; at batch 1 this is aggregate-then-conv."""
    mixed, mixed_bias = mix_experts(attention, weight, bias)
    outs: List[Tensor] = []
    for i in range(x.shape[0]):
        b: Optional[Tensor] = None
        if mixed_bias is not None:
            b = mixed_bias[i]
        outs.append(conv(x[i : i + 1], mixed[i], b, stride, padding, dilation, groups))
    return torch.cat(outs, 0)


def conv_matmul(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                padding: List[int], dilation: List[int], groups: int) -> Tensor:
    """1×1 kernels: ``out[b, g] = W_b[g] @ x[b, g]`` as one batched matrix product."""
    if any([p != 0 for p in padding]):
        raise ValueError("the 'matmul' strategy needs zero padding. Received: padding=" + str(padding))
    if not kernel_is_one(weight):
        raise ValueError("the 'matmul' strategy needs 1x1 kernels. Received: weight shape " + str(list(weight.shape)))
    x = _subsample(x, stride)
    batch, out_channels = x.shape[0], weight.shape[1]
    mixed, mixed_bias = mix_experts(attention, weight, bias)
    w = mixed.reshape(batch, groups, out_channels // groups, -1)
    cols = x.reshape(batch, groups, w.shape[3], -1)
    out = torch.matmul(w.to(cols.dtype), cols)
    out = out.reshape([batch, out_channels] + list(x.shape[2:]))
    return _add_bias(out, mixed_bias)


def _one_hot_taps(in_channels: int, kernel_size: List[int], like: Tensor) -> Tensor:
    # Python ints: under torch.jit.trace sizes are traced tensors, and the TorchScript-based ONNX exporter
    # refuses a convolution whose kernel shape is computed (channel and kernel sizes never vary anyway).
    in_channels = int(in_channels)
    kernel_size = [int(k) for k in kernel_size]
    taps = 1
    for k in kernel_size:
        taps *= k
    eye = torch.eye(taps, dtype=like.dtype, device=like.device)
    eye = eye.reshape([taps, 1] + kernel_size)
    return eye.repeat([in_channels, 1] + [1] * len(kernel_size))


def conv_unfold(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                padding: List[int], dilation: List[int], groups: int) -> Tensor:
    """Patches by a fixed one-hot depthwise convolution, then ``W_b[g] @ patches[b, g]``."""
    batch, in_channels = x.shape[0], x.shape[1]
    kernel_size = list(weight.shape[3:])
    taps = _one_hot_taps(in_channels, kernel_size, x)
    patches = conv(x, taps, None, stride, padding, dilation, in_channels)
    out_size = list(patches.shape[2:])
    out_channels = weight.shape[1]
    mixed, mixed_bias = mix_experts(attention, weight, bias)
    w = mixed.reshape(batch, groups, out_channels // groups, -1)
    cols = patches.reshape(batch, groups, w.shape[3], -1)
    out = torch.matmul(w.to(cols.dtype), cols)
    return _add_bias(out.reshape([batch, out_channels] + out_size), mixed_bias)


def conv_experts(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                 padding: List[int], dilation: List[int], groups: int) -> Tensor:
    """All K kernels in one convolution, outputs mixed per sample: ``sum_k a[b,k] conv(x[b], W_k)``."""
    num_experts, out_channels = weight.shape[0], weight.shape[1]
    per_group = out_channels // groups
    # order output channels (group, expert, channel) so each group's K experts stay in that group
    w = weight.reshape([num_experts, groups, per_group] + list(weight.shape[2:])).transpose(0, 1)
    w = w.reshape([groups * num_experts * per_group] + list(weight.shape[2:]))
    y = conv(x, w, None, stride, padding, dilation, groups)
    out_size = list(y.shape[2:])
    if is_channels_last(y):
        # y's memory is (B, *spatial, groups, K, per_group): mix as (1, K) @ (K, per_group) per sample, position
        # and group, straight from that memory, into a channels_last output (reshaping y to the layout below
        # would copy all K outputs into the contiguous format, and the rest of a channels_last network would
        # run on a contiguous output: `dyconv bench`'s DY-MobileNetV2 training step, whose 1x1 layers at 4x4
        # take this strategy)
        positions = product(out_size)
        y_last = y.permute([0] + list(range(2, y.dim())) + [1]).reshape(y.shape[0], positions, groups,
                                                                          num_experts, per_group)
        a = attention.to(y.dtype).reshape(attention.shape[0], 1, 1, 1, num_experts)
        out = channels_first(torch.matmul(a, y_last), out_size)
    else:
        y = y.reshape(y.shape[0], groups, num_experts, -1)
        # mix as (1, K) @ (K, per_group * L) per sample and group: one pass over the K outputs (in onnxruntime
        # about a quarter faster than multiply-then-sum, which writes and re-reads K outputs)
        a = attention.to(y.dtype).reshape(attention.shape[0], 1, 1, num_experts)
        out = torch.matmul(a, y).reshape([y.shape[0], out_channels] + out_size)
    return _add_bias(out, mix_bias(attention, bias))


def conv_scaled_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                       padding: List[int], dilation: List[int], groups: int) -> Tensor:
    """The input repeated K times, copy k scaled by ``a[b,k]``, convolved with the K kernels side by side along the
    input channels: ``conv([a[b,1] x[b], ..., a[b,K] x[b]], [W_1, ..., W_K]) = sum_k a[b,k] conv(x[b], W_k)``."""
    num_experts, out_channels, in_per_group = weight.shape[0], weight.shape[1], weight.shape[2]
    batch, rank = x.shape[0], x.dim() - 2
    spatial = list(x.shape[2:])
    # (C_out, K * C_in/g, *kernel): each output channel's K experts side by side, matching the scaled copies'
    # channel order (group, expert, channel), so each group's copies stay in that group
    w = weight.transpose(0, 1).reshape([out_channels, num_experts * in_per_group] + list(weight.shape[3:]))
    a = attention.to(x.dtype)
    mixed_bias = mix_bias(attention, bias)
    if is_channels_last(x):
        # x's memory is (B, *spatial, g, C_in/g): the scaled copies as (B, *spatial, g, K, C_in/g) memory, a
        # channels_last input (the contiguous layout below would turn a channels_last network contiguous)
        x_last = x.permute([0] + list(range(2, x.dim())) + [1]).reshape([batch] + spatial + [groups, 1, in_per_group])
        scaled = x_last * a.reshape([batch] + [1] * rank + [1, num_experts, 1])
        if uses_matmul(weight, stride, padding, dilation, groups):
            # unpadded stride-1 1x1 kernels: one matrix product, (B * L, K * C_in) @ (K * C_in, C_out), written as
            # a channels_last output (F.linear: faster than the convolution here, both directions)
            positions = product(spatial)
            y = F.linear(scaled.reshape(batch * positions, num_experts * in_per_group),
                         w.reshape(out_channels, num_experts * in_per_group).to(x.dtype))
            return _add_bias(channels_first(y.reshape(batch, positions, out_channels), spatial), mixed_bias)
        x_k = channels_first(scaled, spatial)
    else:
        scaled = x.reshape([batch, groups, 1, in_per_group] + spatial) * a.reshape([batch, 1, num_experts, 1]
                                                                                     + [1] * rank)
        x_k = scaled.reshape([batch, groups * num_experts * in_per_group] + spatial)
    return _add_bias(conv(x_k, w.to(x.dtype), None, stride, padding, dilation, groups), mixed_bias)


def conv_unfold_experts(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                        padding: List[int], dilation: List[int], groups: int) -> Tensor:
    """Patches by the one-hot convolution, ``[W_1; ...; W_K][g] @ patches[b, g]``, then the K outputs mixed."""
    batch, in_channels = x.shape[0], x.shape[1]
    num_experts, out_channels = weight.shape[0], weight.shape[1]
    per_group = out_channels // groups
    taps = _one_hot_taps(in_channels, list(weight.shape[3:]), x)
    patches = conv(x, taps, None, stride, padding, dilation, in_channels)
    out_size = list(patches.shape[2:])
    positions = product(out_size)
    # (g, B * L, C_in/g * taps): one matrix product per group over the whole batch (a broadcast matmul
    # would expand the experts to one copy per sample)
    last = is_channels_last(patches)
    if last:
        # channels_last input: the patches' memory is (B, L, g, C_in/g * taps) already (a view when g = 1)
        cols = patches.permute([0] + list(range(2, patches.dim())) + [1]).reshape(batch, positions, groups, -1)
        cols = cols.permute(2, 0, 1, 3).reshape(groups, batch * positions, -1)
    else:
        cols = patches.reshape(batch, groups, -1, positions).permute(1, 0, 3, 2).reshape(groups, batch * positions,
                                                                                          -1)
    if groups == 1:
        # F.linear with the K experts as its (K * C_out, C_in * taps) weight, a view (no copy of the K kernels,
        # which autograd would keep for backward): its backward writes the experts' gradient in their own
        # layout, where a product with the transposed view wrote it transposed and autograd then copied all
        # K kernels' worth of gradient back (`dyconv bench`, row 3x3 512->512 @7, training step: 4.29-5.48x
        # static before, 3.99-4.12x after)
        cols = cols.reshape(batch * positions, -1)
        taps_last = list(range(3, weight.dim())) + [2]
        if _chunked.memory_order(weight) == [1] + taps_last:
            # channels_last experts, whose memory is (K, C_out, *kernel, C_in): the patches' columns reordered
            # from (C_in, taps) to (taps, C_in) instead, so the experts stay a view. Reshaping them would copy
            # all K kernels (kept for backward), and their gradient would come back contiguous and be copied
            # once more into the parameter's layout (DY-ResNet-18's channels_last training step at 112², whose
            # 3x3 layers at 4x4 take this strategy: peak 407 -> 365 MB, benchmarks/memory_readings.py)
            w = weight.permute([0, 1] + taps_last).reshape(num_experts * per_group, -1)
            cols = cols.reshape(batch * positions, in_channels, -1).transpose(1, 2).reshape(batch * positions, -1)
        else:
            w = weight.reshape(num_experts * per_group, -1)
        y = F.linear(cols, w.to(cols.dtype)).unsqueeze(0)  # (1, B * L, K * C_out)
    else:
        # (g, C_in/g * taps, K * per_group): each group's K experts side by side
        w = weight.reshape(num_experts, groups, per_group, -1).permute(1, 3, 0, 2)
        w = w.reshape(groups, -1, num_experts * per_group)
        y = torch.bmm(cols, w.to(cols.dtype))  # (g, B * L, K * per_group)
    y = y.reshape(groups, batch, positions, num_experts, per_group)
    a = attention.to(y.dtype).reshape(1, batch, 1, 1, num_experts)
    out = torch.matmul(a, y)  # (g, B, L, 1, per_group)
    if last:
        # channels_last in, channels_last out: (B, L, g, per_group) memory (a view when g = 1)
        out = channels_first(out.reshape(groups, batch, positions, per_group).permute(1, 2, 0, 3), out_size)
    else:
        out = out.reshape(groups, batch, positions, per_group).permute(1, 0, 3, 2)
        out = out.reshape([batch, out_channels] + out_size)
    return _add_bias(out, mix_bias(attention, bias))


# In eager mode, ungrouped layers whose output is tiny convolve with all K kernels and mix the outputs instead of
# writing per-sample kernels: when (output positions per sample) x (K - 1) is at most EXPERTS_MAX_POSITIONS,
# since mixing costs about as much per kernel element as a few dozen multiply-adds of the convolution (deep
# layers on small images). Among those, "unfold_experts" (matrix products) where the convolution's own kernels
# are slow: at most UNFOLD_EXPERTS_MAX_POSITIONS output positions, or wide inputs (>= 256 channels); never for
# 1x1 kernels, whose "experts" convolution is already one matrix product (at 4x4 outputs, batch 32, training:
# "experts" 14-69 ms against "unfold_experts" 21-79 ms for MobileNetV2's 1x1 shapes). Unpadded stride-1 1x1
# kernels with more output than input channels (MobileNetV2's expansions) take "scaled_inputs" instead: the same
# K-fold arithmetic, on K scaled copies of the input rather than K outputs (benchmarks/mixing.py --part tiny1x1).
# Measured with benchmarks/mixing.py (training step; the thresholds were set from one-thread runs and checked with
# two threads on the quiet machine, where it picks the fastest in 4 of 6 shapes, the others within 6 % and 17 %).
EXPERTS_MAX_POSITIONS = 48
UNFOLD_EXPERTS_MAX_POSITIONS = 4
# ... except where the compiled "dense_kernel" applies (_dense_kernel_suits) and the output has at least this many
# positions. Batch 32, 3x3 64/256/512 channels, ratios to static (benchmarks/strategies.py --layers "3x3 64" "3x3 256"
# "3x3 512" --sizes 2 3 4 --strategies dense_kernel unfold_experts experts, and --sizes 4 6 8 --train for the training
# step at half those sizes; 2026-11-30, with dense_forward's channels loop): at 3x3 and 4x4 outputs it was the fastest
# in all twelve cells (3x3 inference 2.32x / 3.02x / 3.31x against the rules' choice 2.77x / 7.95x / 7.59x, training
# 2.45x / 3.20x / 4.10x against 2.64x / 5.89x / 6.18x); at 2x2 in three of six and within 15 % of the fastest in the
# others, where the rules' choice took up to 2.9x its time (inference 2.85x / 4.69x / 4.68x against 8.27x / 9.89x /
# 7.52x, training 2.55x / 3.56x / 3.84x against 4.57x / 4.32x / 3.64x). For 1x1 kernels (where the dense kernel takes
# them: batch >= 8, _cpu_kernel.DENSE_1X1_MAX_POSITIONS) it was faster than "experts" and "scaled_inputs" in all 24
# cells of benchmarks/strategies.py --layers 1x1 --sizes 4 6 8 --train --format channels_last --settle 1 --strategies
# experts scaled_inputs dense_kernel (2026-11-30; training at 4x4: 96->576 1.88x against 3.63x / 2.92x, 576->96 2.49x
# against 4.00x / 5.52x).
DENSE_OVER_TINY_MIN_POSITIONS = 4
# On other devices (CUDA), where a layer's cost at these sizes is mostly its launches: "experts" (one dense
# convolution with all K kernels) for ungrouped layers of at most this many output positions, and never
# "unfold_experts". benchmarks/strategies.py --device cuda --train (H200, batch 32, ratios to static): "experts"
# was faster than "chunked" for every ungrouped shape of the bench at 7² and 14², inference and training (3×3
# 512->512 @7 inference 3.65x against 11.9x, training 2.24x against 6.59x; 1x1 576->96 @14 3.37x against 4.27x,
# 2.34x against 2.63x), and slower at 56² inference (3×3 64->64 4.07x against 3.54x).
ACCELERATOR_EXPERTS_MAX_POSITIONS = 196


@torch.jit.unused
def _experts_limits(device_type: str) -> List[int]:
    if device_type not in _chunked.CPU_RULES:
        return [-1, -1, ACCELERATOR_EXPERTS_MAX_POSITIONS]
    return [EXPERTS_MAX_POSITIONS, UNFOLD_EXPERTS_MAX_POSITIONS, -1]


@torch.jit.unused
def _dense_kernel_suits(x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                        groups: int) -> bool:
    """Where ``"dense_kernel"`` is the default: more than one expert, at most ``_cpu_kernel.DENSE_MAX_POSITIONS``
    output positions per sample (1×1 kernels: at most ``_cpu_kernel.DENSE_1X1_MAX_POSITIONS``, from batch
    ``_cpu_kernel.DENSE_1X1_MIN_BATCH`` on); where gradients are needed (the input or the experts require them), only
    at batch > 1 and with padding that the compiled backward takes (``_cpu_kernel.dense_backward_applies``); and the
    kernel applies."""
    if weight.shape[0] == 1:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        if x.shape[0] == 1 or not _cpu_kernel.dense_backward_applies(weight, padding, dilation):
            return False
    positions = output_positions(x, weight, stride, padding, dilation)
    if kernel_is_one(weight):
        if x.shape[0] < _cpu_kernel.DENSE_1X1_MIN_BATCH or positions > _cpu_kernel.DENSE_1X1_MAX_POSITIONS:
            return False
    if positions > _cpu_kernel.DENSE_MAX_POSITIONS:
        return False
    return _cpu_kernel.dense_applies(x, weight, stride, groups)


def select_strategy(x: Tensor, weight: Tensor, padding: List[int], groups: int,
                    stride: Optional[List[int]] = None, dilation: Optional[List[int]] = None) -> str:
    """The strategy :func:`dynamic_conv` uses for these shapes.

    ``padding`` is the convolution's symmetric padding, one int per spatial dimension. In eager mode, for
    ungrouped layers at batch > 1 whose output is tiny (at most ``EXPERTS_MAX_POSITIONS / (K - 1)`` positions
    per sample, given ``stride`` and ``dilation``), unless ``"dense_kernel"`` takes it (below; from
    ``DENSE_OVER_TINY_MIN_POSITIONS`` positions): ``"unfold_experts"`` (at most
    ``UNFOLD_EXPERTS_MAX_POSITIONS`` positions or at least 256 input channels, kernels larger than 1×1),
    ``"scaled_inputs"`` (unpadded stride-1 1×1 kernels with more output than input channels) or ``"experts"``;
    depthwise layers on the CPU with channels_last float32/float64 input, where the compiled kernel could be
    built: ``"depthwise_kernel"``; ungrouped stride-1 layers on the CPU (float32/float64) with more than one
    expert and small outputs (``_dense_kernel_suits``; 1×1 kernels at batch >= 8 and smaller outputs; with gradients
    at batch > 1 only): ``"dense_kernel"``;
    otherwise ``"chunked"``. On other devices than the CPU (and ``meta``) instead:
    ``"experts"`` for ungrouped layers at batch > 1 with at most ``ACCELERATOR_EXPERTS_MAX_POSITIONS`` output
    positions, else ``"chunked"``.
    While tracing, exporting or compiling, only strategies without batch-size constants qualify.
    """
    batch_generic = False
    if not torch.jit.is_scripting():
        batch_generic = tracing_exporting_or_compiling()
    if not batch_generic:
        if not torch.jit.is_scripting():
            if groups > 1 and _cpu_kernel.applies(x, weight, groups):
                return "depthwise_kernel"
        num_experts = weight.shape[0]
        dense_asked = False  # whether _dense_kernel_suits has been asked (and said no)
        if stride is not None and dilation is not None and groups == 1 and num_experts > 1 and x.shape[0] > 1:
            # TorchScript reads no module globals (and keeps the CPU's rule); eager mode reads the constants
            limits = [48, 4, -1]
            if not torch.jit.is_scripting():
                limits = _experts_limits(x.device.type)
            positions = output_positions(x, weight, stride, padding, dilation)
            if positions <= limits[2]:
                return "experts"
            tiny = positions * (num_experts - 1) <= limits[0]
            if not torch.jit.is_scripting():
                if not tiny or positions >= DENSE_OVER_TINY_MIN_POSITIONS:
                    if _dense_kernel_suits(x, weight, stride, padding, dilation, groups):
                        return "dense_kernel"
                    dense_asked = True
            if tiny:
                if (positions <= limits[1] or x.shape[1] >= 256) and not kernel_is_one(weight):
                    return "unfold_experts"
                if weight.shape[1] > x.shape[1] and uses_matmul(weight, stride, padding, dilation, groups):
                    return "scaled_inputs"  # 1x1 expansions: K copies of the smaller input, not K outputs
                return "experts"
        if not torch.jit.is_scripting():
            if stride is not None and dilation is not None and not dense_asked:
                if _dense_kernel_suits(x, weight, stride, padding, dilation, groups):
                    return "dense_kernel"
        # batch chunks bound the mixed kernels' memory, forward and backward; one chunk of one sample
        # is aggregate-then-convolve, one chunk of many is batch-as-groups (or one bmm for 1x1)
        return "chunked"
    one_by_one = kernel_is_one(weight) and not any([p != 0 for p in padding])
    if one_by_one:
        return "matmul"
    return "experts" if weight.shape[2] == 1 else "unfold"


def dynamic_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                 padding: List[int], dilation: List[int], groups: int, padding_mode: str = "zeros",
                 strategy: str = "auto") -> Tensor:
    """Convolve each sample with its own attention-weighted mixture of kernels.

    Args:
        x: input ``(B, C_in, *spatial)`` with 1 to 3 spatial dimensions.
        weight: expert kernels ``(K, C_out, C_in // groups, *kernel_size)``.
        bias: expert biases ``(K, C_out)`` or ``None``.
        attention: mixing weights ``(B, K)``; the layers pass a softmax, any weights work here.
        stride, dilation: one int per spatial dimension.
        padding: (before, after) per spatial dimension, flattened in dimension order.
        groups: convolution groups.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        strategy: ``'auto'`` or one of :data:`STRATEGIES`.

    Returns:
        ``(B, C_out, *out_spatial)``, sample ``b`` equal to
        ``conv(x[b], sum_k attention[b,k] weight[k]) + sum_k attention[b,k] bias[k]``.

    Example:
        >>> x = torch.randn(2, 4, 8, 8)
        >>> w, a = torch.randn(3, 6, 4, 3, 3), torch.softmax(torch.randn(2, 3), 1)
        >>> dynamic_conv(x, w, None, a, [1, 1], [1, 1, 1, 1], [1, 1], 1).shape
        torch.Size([2, 6, 8, 8])
    """
    x, conv_padding = apply_padding(x, padding, padding_mode)
    if x.shape[0] == 0:
        # an empty batch, which nn.ConvNd accepts: the output's shape from one expert's convolution, and every
        # gradient zero (the attention joins the graph, so the router's parameters get theirs too)
        first_bias: Optional[Tensor] = None
        if bias is not None:
            first_bias = bias[0]
        out = conv(x, weight[0], first_bias, stride, conv_padding, dilation, groups)
        return out + attention.sum().to(out.dtype) * 0
    if strategy == "auto":
        strategy = select_strategy(x, weight, conv_padding, groups, stride, dilation)
    if strategy == "groups":
        return conv_groups(x, weight, bias, attention, stride, conv_padding, dilation, groups)
    if strategy == "loop":
        return conv_loop(x, weight, bias, attention, stride, conv_padding, dilation, groups)
    if strategy == "matmul":
        return conv_matmul(x, weight, bias, attention, stride, conv_padding, dilation, groups)
    if strategy == "unfold":
        return conv_unfold(x, weight, bias, attention, stride, conv_padding, dilation, groups)
    if strategy == "experts":
        return conv_experts(x, weight, bias, attention, stride, conv_padding, dilation, groups)
    if strategy == "unfold_experts":
        return conv_unfold_experts(x, weight, bias, attention, stride, conv_padding, dilation, groups)
    if strategy == "scaled_inputs":
        return conv_scaled_inputs(x, weight, bias, attention, stride, conv_padding, dilation, groups)
    if strategy == "chunked":
        return conv_chunked(x, weight, bias, attention, stride, conv_padding, dilation, groups)
    if strategy == "depthwise_kernel":
        if not torch.jit.is_scripting():
            return conv_depthwise_kernel(x, weight, bias, attention, stride, conv_padding, dilation, groups)
        raise RuntimeError("strategy 'depthwise_kernel' runs in eager mode only (not in TorchScript)")
    if strategy == "dense_kernel":
        if not torch.jit.is_scripting():
            return conv_dense_kernel(x, weight, bias, attention, stride, conv_padding, dilation, groups)
        raise RuntimeError("strategy 'dense_kernel' runs in eager mode only (not in TorchScript)")
    raise ValueError("strategy must be 'auto', 'groups', 'loop', 'matmul', 'unfold', 'experts', 'unfold_experts', "
                     "'scaled_inputs', 'chunked', 'depthwise_kernel' or 'dense_kernel'. "
                     "Received: strategy='" + strategy + "'")
