"""``DynamicConv1d/2d/3d``: drop-in replacements for ``nn.Conv1d/2d/3d`` with K attention-mixed kernels."""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor, nn

from . import _args
from .attention import ExpertAttention
from . import _chunked, _one_sample
from .functional import STRATEGIES, dynamic_conv


class _DynamicConvNd(nn.Module):
    """Rank-generic dynamic convolution (Chen et al., CVPR 2020). Use the 1-D/2-D/3-D subclasses.

    For a batch ``x`` the layer computes, per sample ``b``,

        pi_b = softmax(fc2(relu(fc1(avgpool(x_b)))) / temperature)          (K values, sum 1)
        out_b = conv(x_b, sum_k pi_bk W_k) + sum_k pi_bk b_k

    The positional arguments are exactly ``nn.ConvNd``'s, in the same order and with the same
    meaning. Keyword-only extras:

    Args:
        num_experts: K, the number of kernels mixed per sample (paper default 4).
        reduction: the attention's hidden width is ``max(in_channels // reduction, 4)``.
        temperature: softmax temperature; a buffer, so it is saved in ``state_dict``. Anneal it
            with :class:`dyconv.TemperatureScheduler` (paper: 30 → 1 over 10 epochs).
        strategy: how the per-sample convolution is computed (``'auto'`` picks from the shapes;
            see :mod:`dyconv.functional`). Every strategy gives the same numbers.

    Attributes:
        weight: ``(num_experts, out_channels, in_channels // groups, *kernel_size)``.
        bias: ``(num_experts, out_channels)`` or ``None``.
        router: the attention branch (:class:`dyconv.attention.ExpertAttention`).
        temperature: 0-d buffer.
    """

    _rank: int = 0
    __constants__ = ["_rank", "stride", "dilation", "groups", "padding_mode", "num_experts", "strategy", "_padding_pairs"]

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 num_experts: int = 4, reduction: int = 4, temperature: float = 30.0, strategy: str = "auto"):
        super().__init__()
        spec = _args.conv_spec(self._rank, in_channels, out_channels, kernel_size, stride, padding, dilation,
                               groups, padding_mode, num_experts, reduction, temperature)
        if strategy != "auto" and strategy not in STRATEGIES:
            raise ValueError(f"strategy must be 'auto' or one of {STRATEGIES}. Received: strategy={strategy!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels = spec.in_channels
        self.out_channels = spec.out_channels
        self.kernel_size = spec.kernel_size
        self.stride = list(spec.stride)
        self.padding = spec.padding
        self.dilation = list(spec.dilation)
        self.groups = spec.groups
        self.padding_mode = spec.padding_mode
        self.num_experts = spec.num_experts
        self.reduction = spec.reduction
        self.strategy = strategy
        self._layer_name = type(self).__name__
        self._padding_pairs: List[int] = [p for pair in spec.explicit_padding() for p in pair]
        # the convolution's own padding when it can pad (zeros, symmetric), for the one-sample inference path
        before, after = self._padding_pairs[0::2], self._padding_pairs[1::2]
        self._conv_padding: Optional[List[int]] = before if padding_mode == "zeros" and before == after else None
        self.weight = nn.Parameter(
            torch.empty((spec.num_experts, spec.out_channels, spec.in_channels // spec.groups, *spec.kernel_size),
                        **factory)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty((spec.num_experts, spec.out_channels), **factory))
        else:
            self.register_parameter("bias", None)
        self.router = ExpertAttention(spec.in_channels, spec.hidden, spec.num_experts, **factory)
        self.register_buffer("temperature", torch.tensor(spec.temperature, dtype=dtype or torch.get_default_dtype(),
                                                         device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every expert independently, exactly as ``nn.ConvNd.reset_parameters`` does one kernel."""
        fan_in = self.weight[0].shape[1:].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        for k in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
            if self.bias is not None:
                nn.init.uniform_(self.bias[k], -bound, bound)
        self.router.fc1.reset_parameters()
        self.router.fc2.reset_parameters()

    @torch.jit.unused
    def _infer_one(self, x: Tensor) -> Optional[Tensor]:
        """Inference on one sample with little dispatch: mix the kernel, convolve (``None``: not applicable).

        Exactly the ``"chunked"`` strategy's computation for a one-sample batch (aggregate-then-convolve) with as
        few operations as possible (:mod:`dyconv._one_sample`): at batch 1 the general bookkeeping costs more than
        small layers' convolutions. Used only in eager mode without gradients, autocast, tracing, export,
        compilation or a Python dispatch mode, for zero symmetric padding and parameters whose dtype matches the
        input's. The kernel is mixed in the experts' memory order (contiguous or channels_last), so it has their
        layout.
        """
        padding = getattr(self, "_conv_padding", None)  # modules pickled before it existed lack it
        if padding is None:
            return None
        return _one_sample.infer(self, x, self.stride, padding, self.dilation, self.groups)

    @torch.jit.unused
    def _infer_depthwise(self, x: Tensor) -> Optional[Tensor]:
        """Inference of a depthwise layer on a channels_last CPU batch in one compiled call (``None``: not
        applicable): the ``"depthwise_kernel"`` strategy's computation, each sample's attention computed as at batch
        1 (:func:`dyconv._one_sample.infer_depthwise`). Used only under the conditions of :meth:`_infer_one`."""
        padding = getattr(self, "_conv_padding", None)
        if padding is None or self.groups == 1:
            return None
        return _one_sample.infer_depthwise(self, x, self.stride, padding, self.dilation, self.groups)

    def _apply(self, fn, recurse=True):
        # model.to(memory_format=torch.channels_last) converts every 4-D and 5-D tensor and refuses a
        # 5-D one; DynamicConv2d's stacked kernels are 5-D. Their layout does not matter (the mixed
        # kernels are computed afresh), so convert them as (K * C_out, ...) and keep their shape.
        def convert(t):
            try:
                return fn(t)
            except RuntimeError as err:
                if "channels_last" not in str(err) or t.dim() != 5:
                    raise
                return fn(t.flatten(0, 1)).reshape(t.shape)

        return super()._apply(convert, recurse)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={tuple(self.stride)}"
        if self.padding != (0,) * self._rank:
            s += f", padding={self.padding!r}"
        if self.dilation != [1] * self._rank:
            s += f", dilation={tuple(self.dilation)}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        s += f", num_experts={self.num_experts}, reduction={self.reduction}"
        if self.strategy != "auto":
            s += f", strategy={self.strategy!r}"
        return s

    def _check_input(self, x: Tensor, allow_unbatched: bool) -> None:
        batched = x.dim() == self._rank + 2
        unbatched = allow_unbatched and x.dim() == self._rank + 1
        if not (batched or unbatched) or x.shape[x.dim() - self._rank - 1] != self.in_channels:
            raise ValueError(
                f"{self._layer_name} expects input of shape (batch, {self.in_channels}, <{self._rank} spatial "
                f"dims>) or ({self.in_channels}, <{self._rank} spatial dims>). Received: input shape "
                f"{list(x.shape)}"
            )

    def attention(self, x: Tensor) -> Tensor:
        """The ``(batch, num_experts)`` mixing weights for a batched input: ``softmax(logits / temperature)``."""
        self._check_input(x, allow_unbatched=False)
        return torch.softmax(self.router(x) / self.temperature, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            # the recording checks first: a trace or torch.compile must not see (and guard on) the batch size;
            # the shape checks are _check_input's for a batched input (which raises below where they fail)
            if (not torch.is_grad_enabled() and self.strategy == "auto" and not _chunked.tracing_exporting_or_compiling()
                    and x.dim() == self._rank + 2 and x.shape[0] >= 1 and x.shape[1] == self.in_channels):
                out = self._infer_one(x) if x.shape[0] == 1 else self._infer_depthwise(x)
                if out is not None:
                    return out
        self._check_input(x, allow_unbatched=True)
        unbatched = x.dim() == self._rank + 1
        if unbatched:
            x = x.unsqueeze(0)
        attention = self.attention(x)
        out = dynamic_conv(x, self.weight, self.bias, attention, self.stride, self._padding_pairs, self.dilation,
                           self.groups, self.padding_mode, self.strategy)
        if unbatched:
            out = out.squeeze(0)
        return out


class DynamicConv1d(_DynamicConvNd):
    """Dynamic 1-D convolution, a drop-in for ``nn.Conv1d`` (see :class:`_DynamicConvNd`).

    Example:
        >>> layer = DynamicConv1d(8, 16, 3, padding=1, num_experts=4)
        >>> layer(torch.randn(2, 8, 50)).shape
        torch.Size([2, 16, 50])
    """

    _rank = 1


class DynamicConv2d(_DynamicConvNd):
    """Dynamic 2-D convolution, a drop-in for ``nn.Conv2d`` (see :class:`_DynamicConvNd`).

    Example:
        >>> layer = DynamicConv2d(16, 32, 3, stride=2, padding=1)
        >>> layer(torch.randn(2, 16, 28, 28)).shape
        torch.Size([2, 32, 14, 14])
    """

    _rank = 2


class DynamicConv3d(_DynamicConvNd):
    """Dynamic 3-D convolution, a drop-in for ``nn.Conv3d`` (see :class:`_DynamicConvNd`).

    Example:
        >>> layer = DynamicConv3d(4, 8, (3, 3, 3), padding="same")
        >>> layer(torch.randn(1, 4, 6, 8, 8)).shape
        torch.Size([1, 8, 6, 8, 8])
    """

    _rank = 3


DYNAMIC_CONV_TYPES = (DynamicConv1d, DynamicConv2d, DynamicConv3d)
