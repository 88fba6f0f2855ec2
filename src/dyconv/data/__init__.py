"""Datasets for training and evaluation: Fashion-MNIST, MNIST-1D, CIFAR-10/100, ImageFolder.

:func:`load_dataset` returns the train / validation / test splits with what a model needs to know
(``in_channels``, ``num_classes``, input size) and how to preprocess them. The validation split is carved
from the training set with a fixed seed (independent of the training seed); the test set is for final
numbers only.

Example:
    >>> data = load_dataset("fashion-mnist", val_fraction=0.1)
    >>> data.in_channels, data.num_classes, len(data.train), len(data.val), len(data.test)
    (1, 10, 54000, 6000, 10000)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .arrays import ArrayDataset, train_val_split
from .cifar import load_cifar
from .fashion_mnist import load_fashion_mnist, read_idx
from .imagefolder import ImageFolderDataset, load_imagefolder
from .loader import BatchLoader
from .mnist1d import load_mnist1d
from .transforms import augment_images, normalize

DATASETS = ("fashion-mnist", "mnist1d", "cifar10", "cifar100", "imagefolder")


@dataclass
class DataSplits:
    """The three splits of a dataset and how to feed them to a model."""

    name: str
    train: Any
    val: Any
    test: Any
    num_classes: int
    in_channels: int
    input_size: tuple[int, ...]  # spatial size of one sample, e.g. (28, 28) or (40,)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: dict | None = None
    classes: list[str] = field(default_factory=list)

    @property
    def small_input(self) -> bool:
        """Whether a model should use its small-image stem (inputs of at most 64 pixels a side)."""
        return len(self.input_size) == 2 and max(self.input_size) <= 64


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, val_fraction: float = 0.1,
                 split_seed: int = 0, train_subset: int | None = None, image_size: int = 32,
                 download: bool = True) -> DataSplits:
    """Load ``name`` (one of :data:`DATASETS`) and split it into train / validation / test.

    Args:
        data_dir: where to look first (required for ``imagefolder``).
        val_fraction: share of the training set held out for validation (fixed ``split_seed``).
        train_subset: keep only this many (fixed-seed random) training samples after the split — a smaller
            budget for quick experiments; validation and test sets are unchanged.
        image_size: side of ImageFolder images after resize + center crop.
        download: allow downloading Fashion-MNIST when it is nowhere on disk.
    """
    if name == "fashion-mnist":
        from . import fashion_mnist as fm

        train, test = load_fashion_mnist(data_dir, download_missing=download)
        spec = dict(num_classes=10, in_channels=1, input_size=(28, 28), mean=fm.MEAN, std=fm.STD,
                    augment={"padding": 2, "flip": True})
    elif name == "mnist1d":
        train, test = load_mnist1d()
        spec = dict(num_classes=10, in_channels=1, input_size=(40,), mean=(0.0,), std=(1.0,), augment=None)
    elif name in ("cifar10", "cifar100"):
        from . import cifar

        k = 10 if name == "cifar10" else 100
        train, test = load_cifar(k, data_dir)
        spec = dict(num_classes=k, in_channels=3, input_size=(32, 32), mean=cifar.MEAN[k], std=cifar.STD[k],
                    augment={"padding": 4, "flip": True})
    elif name == "imagefolder":
        from . import imagefolder

        train, test = load_imagefolder(data_dir, image_size)
        spec = dict(num_classes=len(train.classes), in_channels=3, input_size=(image_size, image_size),
                    mean=imagefolder.MEAN, std=imagefolder.STD,
                    augment={"padding": max(1, image_size // 8), "flip": True})
    else:
        raise ValueError(f"Unknown dataset. Expected one of {list(DATASETS)}. Received: {name!r}")
    train_idx, val_idx = train_val_split(len(train), val_fraction, split_seed)
    val = train.subset(val_idx)
    if train_subset is not None:
        if train_subset < 1:
            raise ValueError(f"train_subset must be positive. Received: train_subset={train_subset!r}")
        import torch

        keep = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(split_seed + 1))[:train_subset]
        train_idx = train_idx[keep.sort().values]
    return DataSplits(name=name, train=train.subset(train_idx), val=val, test=test,
                      classes=list(train.classes), **spec)


__all__ = ["DATASETS", "ArrayDataset", "BatchLoader", "DataSplits", "ImageFolderDataset", "augment_images",
           "load_cifar", "load_dataset", "load_fashion_mnist", "load_imagefolder", "load_mnist1d", "normalize",
           "read_idx", "train_val_split"]
