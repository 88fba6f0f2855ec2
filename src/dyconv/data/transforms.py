"""Batch-level preprocessing: normalisation and the standard image augmentation (padded crop + flip).

Augmentation works on whole batches with an explicit ``torch.Generator``, so that a training run's data
order and augmentation depend only on (seed, epoch, rank): this is what makes resume bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 images ``(B, C, H, W)`` in [0, 255] (or floats, left unscaled) → float ``(x - mean) / std`` per channel."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    else:
        x = x.float()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
    return (x - mean_t) / std_t


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad ``(B, C, H, W)`` by ``padding`` on every side, then crop each sample at its own random offset."""
    if padding <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 puts the channel dim last: (B, H, W, C).
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each sample of ``(B, C, H, W)`` left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment_images(x: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Standard augmentation for small images: padded random crop, then (optionally) horizontal flip."""
    x = random_crop(x, padding, generator)
    return random_flip(x, generator) if flip else x
