"""Optimizer and learning-rate schedule: SGD (Nesterov) or AdamW, linear warmup then cosine decay per step."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9
                    ) -> torch.optim.Optimizer:
    """Weight decay on weight matrices and kernels only: biases and normalisation scales (1-D) are exempt,
    as in timm and torchvision's reference recipes."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw'. Received: {name!r}")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """LR factor rising linearly over ``warmup_steps`` then following a cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
