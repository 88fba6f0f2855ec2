"""Plain per-sample reference for dynamic convolution, built from ``nn.ConvNd`` (used by several tests)."""

import torch
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}

# Tolerances keyed by dtype (kornia style).
TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.bfloat16: {"rtol": 5e-2, "atol": 5e-2},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
}


def manual_attention(layer, x):
    """softmax(fc2(relu(fc1(mean over space))) / temperature), written out by hand."""
    pooled = x.flatten(2).mean(2)
    hidden = torch.relu(pooled @ layer.router.fc1.weight.T + layer.router.fc1.bias)
    logits = hidden @ layer.router.fc2.weight.T + layer.router.fc2.bias
    return torch.softmax(logits / layer.temperature, dim=1)


def per_sample_reference(layer, x, attention=None):
    """For each sample, an ``nn.ConvNd`` with the attention-weighted kernel and bias."""
    rank = x.dim() - 2
    if attention is None:
        attention = manual_attention(layer, x)
    outs = []
    for b in range(x.shape[0]):
        conv = CONV[rank](
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=tuple(layer.stride),
            padding=layer.padding, dilation=tuple(layer.dilation), groups=layer.groups,
            bias=layer.bias is not None, padding_mode=layer.padding_mode, dtype=x.dtype, device=x.device,
        )
        with torch.no_grad():
            conv.weight.copy_(torch.einsum("k,k...->...", attention[b], layer.weight))
            if layer.bias is not None:
                conv.bias.copy_(attention[b] @ layer.bias)
        outs.append(conv(x[b : b + 1]))
    return torch.cat(outs)
