"""The attention branch of a dynamic convolution: one distribution over the K experts per sample."""

from __future__ import annotations

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
        dims = [i for i in range(2, x.dim())]
        recording = False
        one_sample = False
        if not torch.jit.is_scripting():
            recording = tracing_exporting_or_compiling()
            # (not under autocast, which casts addmm's inputs but not addmv's, nor for mixed dtypes)
            one_sample = (not recording and x.shape[0] == 1 and x.dtype == self.fc1.weight.dtype
                          and autocast_dtype(x.device.type) is None and not python_dispatch_active())
        if not recording:
            # the mean's 1/n folded into fc1's product: one op fewer per call, and backward expands the pooled
            # gradient instead of writing an input-sized quotient (``mean``'s backward)
            positions = 1
            for i in dims:
                positions *= x.shape[i]
            summed = x.sum(dims)
            scale = 1.0 / max(positions, 1)
            if one_sample:
                # one sample: matrix-vector products, cheaper than one-row matrix products (benchmarks/batch1_parts.py)
                hidden = torch.relu(torch.addmv(self.fc1.bias, self.fc1.weight, summed[0], alpha=scale))
                return torch.addmv(self.fc2.bias, self.fc2.weight, hidden).unsqueeze(0)
            hidden = torch.addmm(self.fc1.bias, summed, self.fc1.weight.t(), alpha=scale)
        else:  # traces and exports keep the plain mean, whose graph needs no spatial size
            hidden = self.fc1(x.mean(dims))
        return self.fc2(torch.relu(hidden))

