"""CIFAR-10 and CIFAR-100 from their standard "python version" folders.

``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``) and ``cifar-100-python/``
(``train``, ``test``, ``meta``), as extracted from the official archives, looked up in ``data_dir`` and in
the user cache. These are pickles: only load folders you obtained from a source you trust.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .arrays import ArrayDataset
from .fashion_mnist import cache_dir

MEAN = {10: (0.4914, 0.4822, 0.4465), 100: (0.5071, 0.4865, 0.4409)}
STD = {10: (0.2470, 0.2435, 0.2616), 100: (0.2673, 0.2564, 0.2762)}
FOLDERS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}
URLS = {10: "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        100: "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _images(batch: dict) -> torch.Tensor:
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"CIFAR batch has data of shape {data.shape}, expected (N, 3072).")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())


def _locate(num_classes: int, data_dir) -> Path:
    folder = FOLDERS[num_classes]
    candidates = ([Path(data_dir), Path(data_dir) / folder] if data_dir is not None else []) + [cache_dir() / folder]
    marker = "test_batch" if num_classes == 10 else "test"
    for d in candidates:
        if (d / marker).is_file():
            return d
    looked = "\n".join(f"  - {d}" for d in candidates)
    raise FileNotFoundError(
        f"CIFAR-{num_classes} not found. Looked for the python-format folder {folder}/ (with {marker}) in:\n"
        f"{looked}\nDownload {URLS[num_classes]}, extract it, and pass --data-dir to the folder containing {folder}/.")


def load_cifar(num_classes: int = 10, data_dir: str | os.PathLike | None = None
               ) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)``: 50 000 and 10 000 uint8 images ``(N, 3, 32, 32)`` with labels."""
    if num_classes not in FOLDERS:
        raise ValueError(f"num_classes must be 10 or 100. Received: num_classes={num_classes!r}")
    d = _locate(num_classes, data_dir)
    if num_classes == 10:
        train = [_unpickle(d / f"data_batch_{i}") for i in range(1, 6) if (d / f"data_batch_{i}").is_file()]
        if not train:
            raise FileNotFoundError(f"CIFAR-10 folder {str(d)!r} has no data_batch_* files.")
        test = [_unpickle(d / "test_batch")]
        key, names = b"labels", [n.decode() for n in _unpickle(d / "batches.meta")[b"label_names"]] \
            if (d / "batches.meta").is_file() else None
    else:
        train, test = [_unpickle(d / "train")], [_unpickle(d / "test")]
        key = b"fine_labels"
        names = [n.decode() for n in _unpickle(d / "meta")[b"fine_label_names"]] if (d / "meta").is_file() else None

    def build(batches):
        x = torch.cat([_images(b) for b in batches])
        y = torch.cat([torch.as_tensor(b[key], dtype=torch.long) for b in batches])
        return ArrayDataset(x, y, names or [str(i) for i in range(num_classes)])

    return build(train), build(test)
