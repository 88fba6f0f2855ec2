"""Demonstrations behind ``dyconv demo``."""

from __future__ import annotations

import torch
from torch import nn

from .layers import DynamicConv2d
from .temperature import dynamic_layers


def smoke_demo(batch_size: int = 8, seed: int = 0) -> torch.Tensor:
    """Build a small DY network, run a batch through it in train and eval mode and print what it did."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        DynamicConv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        DynamicConv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        DynamicConv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    x = torch.randn(batch_size, 1, 28, 28)
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    model.eval()
    with torch.no_grad():
        logits = model(x)
    layer = dynamic_layers(model)[0]
    params = sum(p.numel() for p in model.parameters())
    print(f"dynamic layers: {len(dynamic_layers(model))}, parameters: {params:,}")
    print(f"input {tuple(x.shape)} -> logits {tuple(logits.shape)}")
    print(f"temperature {float(layer.temperature):g}; attention of sample 0 in the first dynamic layer: "
          + ", ".join(f"{v:.3f}" for v in layer.attention(model[:3](x[:1]))[0].tolist()))
    return logits
