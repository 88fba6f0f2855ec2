"""Fashion-MNIST from its IDX files (gzipped or not): found locally, downloaded only when missing.

Search order: ``data_dir``, then ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``),
then the user cache (``$DYCONV_CACHE`` or ``~/.cache/dyconv``) under ``fashion-mnist/``. When none has the
four files and ``download=True``, they are fetched from the dataset's official location into the cache and
verified against the MD5 checksums published by Zalando Research; without network a clear error says where
it looked and how to get the data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .arrays import ArrayDataset

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# The official files and their MD5 checksums, as published in github.com/zalandoresearch/fashion-mnist.
FILES = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = (0.2860,), (0.3530,)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def cache_dir() -> Path:
    """The user cache for datasets: ``$DYCONV_CACHE`` or ``~/.cache/dyconv``."""
    return Path(os.environ.get("DYCONV_CACHE") or Path.home() / ".cache" / "dyconv")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain) into an array of its declared dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (bad magic number {data[:4]!r}).")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise ValueError(f"{str(path)!r} is truncated or corrupted: {len(body)} data bytes, its header "
                         f"declares {expected} for shape {dims}.")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):  # the last is torchvision's raw naming
        if (directory / name).is_file():
            return directory / name
    return None


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched, in order."""
    dirs = []
    if data_dir is not None:
        d = Path(data_dir)
        dirs += [d, d / "fashion-mnist", d / "FashionMNIST" / "raw"]
    return dirs + [SYSTEM_DIR, cache_dir() / "fashion-mnist"]


def locate(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first searched folder that holds all four files, or ``None``."""
    for d in search_dirs(data_dir):
        if all(_find(d, stem) for stem in FILES):
            return d
    return None


def download(target: Path, base_url: str = URL, timeout: float = 30.0) -> Path:
    """Fetch the four files into ``target`` and verify their MD5 checksums (a mismatch deletes the file)."""
    target.mkdir(parents=True, exist_ok=True)
    for stem, md5 in FILES.items():
        dest = target / (stem + ".gz")
        if dest.is_file() and hashlib.md5(dest.read_bytes()).hexdigest() == md5:
            continue
        tmp = dest.with_suffix(".gz.part")
        with urllib.request.urlopen(base_url + stem + ".gz", timeout=timeout) as response:
            tmp.write_bytes(response.read())
        digest = hashlib.md5(tmp.read_bytes()).hexdigest()
        if digest != md5:
            tmp.unlink()
            raise ValueError(f"Downloaded {stem}.gz has MD5 {digest}, expected {md5}; the file was discarded.")
        os.replace(tmp, dest)
    return target


def _missing_message(data_dir) -> str:
    looked = "\n".join(f"  - {d}" for d in search_dirs(data_dir))
    return (
        "Fashion-MNIST not found. Looked for train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
        f"t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz) in:\n{looked}\n"
        "Get the data with one of:\n"
        "  - sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu, installs into /usr/share/datasets)\n"
        f"  - download the four .gz files from {URL} into a folder and pass --data-dir FOLDER\n"
        "  - run once with network access and download enabled (the default) to fill the cache")


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, *, download_missing: bool = True
                       ) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)``: 60 000 and 10 000 uint8 images ``(N, 1, 28, 28)`` with labels 0–9.

    Raises:
        FileNotFoundError: the files are nowhere to be found and cannot be downloaded.
    """
    found = locate(data_dir)
    if found is None and download_missing:
        try:
            found = download(cache_dir() / "fashion-mnist")
        except OSError as e:
            raise FileNotFoundError(_missing_message(data_dir) + f"\n(Download failed: {e})") from None
    if found is None:
        raise FileNotFoundError(_missing_message(data_dir))

    def pair(prefix):
        images = read_idx(_find(found, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(found, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise ValueError(f"Fashion-MNIST files in {str(found)!r} have inconsistent shapes: images "
                             f"{images.shape}, labels {labels.shape}.")
        return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                            CLASSES)

    return pair("train"), pair("t10k")
