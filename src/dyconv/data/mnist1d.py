"""MNIST-1D (Greydanus 2020), generated locally with the ``mnist1d`` package's ``make_dataset``.

The default arguments (4000 train / 1000 test signals of length 40, seed 42) are the ones of the
published benchmark, whose table gives ~94 % test accuracy for a small CNN. The generated arrays are
cached as ``mnist1d-<hash>.npz`` in the user cache because generation takes several seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import torch

from .arrays import ArrayDataset
from .fashion_mnist import cache_dir


def load_mnist1d(*, seed: int = 42, num_samples: int = 5000, cache: bool = True, **overrides
                 ) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)`` float32 signals ``(N, 1, 40)`` with labels 0–9 (80 % / 20 % as in the benchmark)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError("MNIST-1D needs the mnist1d package: pip install 'dyconv[train]' (or mnist1d).") from e
    args = get_dataset_args(as_dict=True)
    args.update(seed=seed, num_samples=num_samples, **overrides)
    args.pop("url", None)
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"mnist1d-{key}.npz"
    data = None
    if cache and path.is_file():
        try:
            with np.load(path) as f:
                data = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            data = None  # an unreadable cache entry is regenerated below
    if data is None:
        from mnist1d.utils import ObjectView

        # make_dataset reseeds the global numpy and python generators; keep the caller's streams intact.
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            made = make_dataset(ObjectView(dict(args, url="")))
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        data = {k: made[k] for k in ("x", "y", "x_test", "y_test")}
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
            np.savez(tmp, **data)
            os.replace(tmp, path)

    def ds(x, y):
        return ArrayDataset(torch.from_numpy(np.asarray(x, dtype=np.float32)).unsqueeze(1),
                            torch.from_numpy(np.asarray(y, dtype=np.int64)))

    return ds(data["x"], data["y"]), ds(data["x_test"], data["y_test"])
