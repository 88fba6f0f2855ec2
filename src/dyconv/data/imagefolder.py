"""Any ImageFolder-style directory (``root/<class>/<image>``), decoded lazily and resized to a fixed size."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .arrays import train_val_split

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics: the usual default


class ImageFolderDataset:
    """Images of ``root/<class>/*`` as uint8 ``(3, size, size)`` (resize shorter side, center crop).

    Indexed by lists of indices like :class:`~dyconv.data.arrays.ArrayDataset`; decoding happens in the
    data loader's worker processes.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 32, indices=None, _base=None):
        from torchvision import datasets, transforms

        self.base = _base or datasets.ImageFolder(str(root))
        self.classes = list(self.base.classes)
        self.indices = list(range(len(self.base))) if indices is None else [int(i) for i in indices]
        self.transform = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                             transforms.PILToTensor()])
        self.image_size = image_size

    @property
    def y(self) -> torch.Tensor:
        return torch.as_tensor([self.base.targets[i] for i in self.indices], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for i in torch.as_tensor(indices, dtype=torch.long).tolist():
            image, label = self.base[self.indices[i]]
            xs.append(self.transform(image.convert("RGB")))
            ys.append(label)
        return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)

    def subset(self, indices) -> ImageFolderDataset:
        return ImageFolderDataset(None, self.image_size, [self.indices[int(i)] for i in indices], _base=self.base)


def load_imagefolder(root: str | os.PathLike, image_size: int = 32, test_fraction: float = 0.2
                     ) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """``(train, test)`` from ``root/train`` and ``root/test`` (or ``root/val``); with neither, ``root`` itself
    is split, ``test_fraction`` of it (fixed seed) becoming the test set."""
    if root is None:
        raise ValueError("The imagefolder dataset needs --data-dir pointing at root/<class>/<image> folders.")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root {str(root)!r} does not exist.")
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train = ImageFolderDataset(root / "train", image_size)
        test = ImageFolderDataset(test_dir, image_size)
        if test.classes != train.classes:
            raise ValueError(f"{test_dir} and {root / 'train'} have different classes: {test.classes} vs {train.classes}")
        return train, test
    full = ImageFolderDataset(root, image_size)
    train_idx, test_idx = train_val_split(len(full), test_fraction, seed=12345)
    return full.subset(train_idx), full.subset(test_idx)
