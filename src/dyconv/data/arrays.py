"""In-memory datasets indexed by whole batches, and the fixed-seed train/validation split."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ArrayDataset:
    """Samples ``x`` (``(N, C, *spatial)``, uint8 images or float signals) with integer labels ``y`` ``(N,)``.

    ``dataset[indices]`` with a list of indices returns a whole batch ``(x[indices], y[indices])`` in one
    indexing operation: with data in memory this is far cheaper than collating N single samples.
    """

    def __init__(self, x: Tensor, y: Tensor, classes: Sequence[str] | None = None):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same length. Received: x.shape={tuple(x.shape)}, "
                             f"y.shape={tuple(y.shape)}")
        self.x = x
        self.y = y.long()
        self.classes = list(classes) if classes is not None else [str(i) for i in range(int(self.y.max()) + 1)]

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, indices) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.x[index], self.y[index]

    def subset(self, indices: Tensor) -> ArrayDataset:
        return ArrayDataset(self.x[indices], self.y[indices], self.classes)


def train_val_split(n: int, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices ``(train, val)`` of a random split of ``range(n)``, the same for a given ``seed``.

    The split seed is separate from the training seed, so runs with different training seeds validate on
    the same samples. ``val_fraction=0`` gives an empty validation set.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1). Received: val_fraction={val_fraction!r}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values
