"""The attention branch of a dynamic convolution: one distribution over the K experts per sample."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
        pooled = x.mean([i for i in range(2, x.dim())])
        return self.fc2(torch.relu(self.fc1(pooled)))
