"""The attention branch of a dynamic convolution: one distribution over the K experts per sample."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from ._chunked import autocast_dtype, python_dispatch_active, tracing_exporting_or_compiling


class ExpertAttention(nn.Module):
    """Global average pool → linear → ReLU → linear, giving the logits over the K expert kernels.

    There is deliberately no BatchNorm here: a sample's attention (and so its output) must not
    depend on the other samples of its batch, and batch size 1 must train.

    Args:
        in_channels: channels of the layer's input.
        hidden: hidden width (``dyconv._args.attention_hidden`` gives the layers' choice).
        num_experts: K.

    Shape:
        input ``(B, in_channels, *spatial)`` → logits ``(B, num_experts)``.
    """

    def __init__(self, in_channels: int, hidden: int, num_experts: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_channels, hidden, **factory)
        self.fc2 = nn.Linear(hidden, num_experts, **factory)

    def forward(self, x: Tensor) -> Tensor:
        recording = False
        if not torch.jit.is_scripting():
            recording = tracing_exporting_or_compiling()
            if not recording and x.shape[0] == 1 and self.accepts_one_sample(x):
                return self.one_sample(x).unsqueeze(0)
        dims = [i for i in range(2, x.dim())]
        if not recording:
            # the mean's 1/n folded into fc1's product: one op fewer per call, and backward expands the pooled
            # gradient instead of writing an input-sized quotient (``mean``'s backward)
            positions = 1
            for i in dims:
                positions *= x.shape[i]
            hidden = torch.addmm(self.fc1.bias, x.sum(dims), self.fc1.weight.t(), alpha=1.0 / max(positions, 1))
        else:  # traces and exports keep the plain mean, whose graph needs no spatial size
            hidden = self.fc1(x.mean(dims))
        return self.fc2(torch.relu(hidden))

    @torch.jit.unused
    def accepts_one_sample(self, x: Tensor) -> bool:
        """Whether :meth:`one_sample` may compute ``x``'s logits: not under autocast (which casts ``addmm``'s
        inputs but not ``addmv``'s), nor for another dtype than the linear layers', nor under a Python dispatch
        mode (``FlopCounterMode``, which :func:`dyconv.profile` uses, does not count ``addmv``)."""
        dtype = x.dtype
        if self.fc1.weight.dtype != dtype or self.fc2.weight.dtype != dtype:
            return False
        return autocast_dtype(x.device.type) is None and not python_dispatch_active()

    @torch.jit.unused
    def one_sample(self, x: Tensor) -> Tensor:
        """The logits ``(K,)`` of a one-sample batch ``(1, C, *spatial)`` (where :meth:`accepts_one_sample`)."""
        return one_sample_logits(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


@torch.jit.unused
def one_sample_logits(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, scale: float = 1.0,
                      dims: Optional[List[int]] = None) -> Tensor:
    """``scale`` × the attention's logits ``(K,)`` for a one-sample batch ``x`` ``(1, C, *spatial)``, with fc1's
    and fc2's weights and biases: matrix-vector products, cheaper than one-row matrix products
    (``benchmarks/batch1_parts.py``), the mean's 1/n and ``scale`` as the products' scalars (no extra operation).
    ``dims``: ``x``'s batch and spatial dims, if the caller has them."""
    if dims is None:
        dims = [0] + [i for i in range(2, x.dim())]
    summed = x.sum(dims)
    hidden = torch.relu_(torch.addmv(b1, w1, summed, alpha=1.0 / max(x.numel() // x.shape[1], 1)))
    return torch.addmv(b2, w2, hidden, beta=scale, alpha=scale)
