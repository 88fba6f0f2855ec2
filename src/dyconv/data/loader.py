"""Batches for training and evaluation: sharded, shuffled per epoch, augmented, normalised.

Order and augmentation are functions of ``(seed, epoch, rank)`` only (no hidden global random state), so
training restarted at an epoch boundary sees exactly the batches it would have seen without the restart.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from .transforms import augment_images, normalize


class BatchLoader:
    """Iterate ``(x, y)`` float batches of ``dataset`` (indexed by lists of indices).

    Args:
        dataset: an :class:`~dyconv.data.arrays.ArrayDataset` or anything indexed by index lists.
        batch_size: samples per batch and per process.
        mean, std: per-channel normalisation.
        train: shuffle every epoch, drop the last incomplete batch, augment.
        augment: ``{"padding": int, "flip": bool}`` for images, or ``None``.
        seed: base seed of the shuffling and augmentation.
        rank, world_size: this process's shard under distributed training (``DistributedSampler``).
        limit_batches: stop each epoch after this many batches (``None``: all).
        num_workers: loader worker processes (useful for ImageFolder decoding; in-memory data needs none).
    """

    def __init__(self, dataset, batch_size: int, mean, std, *, train: bool, augment: dict | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, limit_batches: int | None = None,
                 num_workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer. Received: batch_size={batch_size!r}")
        self.dataset = dataset
        self.mean, self.std = mean, std
        self.train = train
        self.augment = augment if train else None
        self.seed, self.rank = seed, rank
        self.limit_batches = limit_batches
        if train:
            self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                              seed=seed, drop_last=False)
        else:
            # Evaluation shards without DistributedSampler's padding (which repeats samples), so that the
            # metrics summed over ranks count every sample exactly once.
            self.sampler = range(rank, len(dataset), world_size)
        self.batches = BatchSampler(self.sampler, batch_size, drop_last=train)
        self.loader = DataLoader(dataset, sampler=self.batches, batch_size=None, num_workers=num_workers,
                                 persistent_workers=False)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.batches)
        return min(n, self.limit_batches) if self.limit_batches else n

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + self.rank)
        for i, (x, y) in enumerate(self.loader):
            if self.limit_batches and i >= self.limit_batches:
                break
            if self.augment and x.dim() == 4:
                x = augment_images(x, self.augment.get("padding", 0), self.augment.get("flip", False), generator)
            yield normalize(x, self.mean, self.std), y
