"""Small datasets written in the real on-disk formats, and a tiny model builder, for the training tests."""

import gzip
import pickle
import struct

import numpy as np
import torch
from torch import nn

import dyconv


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_images(n: int, size: int, channels: int, num_classes: int, seed: int):
    """Learnable images: class c is a bright square at a class-specific place on noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n).astype(np.uint8)
    x = rng.integers(0, 60, (n, channels, size, size)).astype(np.uint8)
    for i, c in enumerate(y):
        r, col = (c * 5) % (size - 6), (c * 3) % (size - 6)
        x[i, :, r:r + 6, col:col + 6] = 250
    return x, y


def write_fashion_mnist(directory, n_train: int = 256, n_test: int = 128, compress: bool = True):
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x, y = make_images(n, 28, 1, 10, seed)
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", x[:, 0], compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", y, compress)
    return directory


def write_cifar10(directory, n_per_batch: int = 20):
    folder = directory / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = make_images(n_per_batch, 32, 3, 10, i)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x.reshape(n_per_batch, -1), b"labels": [int(v) for v in y]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return folder


def tiny_model(name, *, num_classes, in_channels, small_input=True, num_experts=2, dropout=0.0):
    """``create_model``-style builder: ``tiny`` (static) or ``dy_tiny`` (one dynamic conv), 2-D or 1-D data."""
    if name not in ("tiny", "dy_tiny", "tiny1d", "dy_tiny1d"):
        raise ValueError(f"unknown model {name!r}")
    one_d = name.endswith("1d")
    conv_static = nn.Conv1d if one_d else nn.Conv2d
    norm = nn.BatchNorm1d if one_d else nn.BatchNorm2d
    pool = nn.AdaptiveAvgPool1d(1) if one_d else nn.AdaptiveAvgPool2d(1)
    if name.startswith("dy"):
        layer = (dyconv.DynamicConv1d if one_d else dyconv.DynamicConv2d)(8, 8, 3, padding=1, num_experts=num_experts)
    else:
        layer = conv_static(8, 8, 3, padding=1)
    return nn.Sequential(conv_static(in_channels, 8, 3, stride=2, padding=1), norm(8), nn.ReLU(),
                         layer, norm(8), nn.ReLU(), pool, nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(8, num_classes))


def state_dicts_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
