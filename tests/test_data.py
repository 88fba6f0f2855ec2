import gzip
import hashlib
import io

import numpy as np
import pytest
import torch

from dyconv.data import (BatchLoader, load_cifar, load_dataset, load_fashion_mnist, load_imagefolder, read_idx,
                         train_val_split)
from dyconv.data import fashion_mnist as fm
from dyconv.data.transforms import augment_images, normalize, random_crop, random_flip
from fakedata import make_images, write_cifar10, write_fashion_mnist, write_idx


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    """Hide the Debian copy and the user cache, so only what a test writes is found."""
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system")
    monkeypatch.setenv("DYCONV_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.gz" if compress else "a")
    write_idx(path, x, compress)
    got = read_idx(path)
    assert got.shape == (2, 3, 4) and np.array_equal(got, x)


def test_read_idx_refuses_truncated_and_foreign(tmp_path):
    x = np.zeros((5, 28, 28), dtype=np.uint8)
    path = tmp_path / "x"
    write_idx(path, x, compress=False)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
    (tmp_path / "y").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "y")


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_data_dir(tmp_path, no_system_data, compress):
    write_fashion_mnist(tmp_path / "fm", 50, 20, compress)
    train, test = load_fashion_mnist(tmp_path / "fm", download_missing=False)
    assert train.x.shape == (50, 1, 28, 28) and train.x.dtype == torch.uint8
    assert test.x.shape == (20, 1, 28, 28) and test.y.dtype == torch.long
    x, y = make_images(50, 28, 1, 10, 1)  # what write_fashion_mnist wrote for the training set
    assert torch.equal(train.x, torch.from_numpy(x)) and torch.equal(train.y, torch.from_numpy(y).long())
    assert train.classes[9] == "Ankle boot"


def test_fashion_mnist_missing_error_says_where_and_how(tmp_path, no_system_data):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError) as e:
        load_fashion_mnist(missing, download_missing=False)
    message = str(e.value)
    assert str(missing) in message and str(tmp_path / "no-system") in message
    assert str(tmp_path / "cache" / "fashion-mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message


def test_fashion_mnist_download_failure_is_reported(tmp_path, no_system_data, monkeypatch):
    def offline(url, timeout):
        raise OSError("network unreachable")

    monkeypatch.setattr(fm.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="network unreachable"):
        load_fashion_mnist(tmp_path / "nothing")


def _serve(files):
    """A fake urlopen serving ``files`` (name -> bytes), recording the URLs asked for."""
    asked = []

    def urlopen(url, timeout):
        asked.append(url)
        return io.BytesIO(files[url.rsplit("/", 1)[1]])

    return urlopen, asked


def test_fashion_mnist_download_verifies_checksums(tmp_path, no_system_data, monkeypatch):
    src = write_fashion_mnist(tmp_path / "served", 30, 10)
    served = {p.name: p.read_bytes() for p in src.iterdir()}
    monkeypatch.setattr(fm, "FILES", {name[:-3]: hashlib.md5(data).hexdigest() for name, data in served.items()})
    urlopen, asked = _serve(served)
    monkeypatch.setattr(fm.urllib.request, "urlopen", urlopen)
    train, test = load_fashion_mnist(tmp_path / "empty")
    assert len(train) == 30 and len(test) == 10 and len(asked) == 4
    assert all(u.startswith(fm.URL) for u in asked)
    assert (tmp_path / "cache" / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file()
    load_fashion_mnist(tmp_path / "empty")  # now cached: nothing is downloaded again
    assert len(asked) == 4


def test_fashion_mnist_download_rejects_bad_checksum(tmp_path, no_system_data, monkeypatch):
    src = write_fashion_mnist(tmp_path / "served", 30, 10)
    served = {p.name: p.read_bytes() for p in src.iterdir()}
    urlopen, _ = _serve(served)  # FILES keeps the official MD5s, which these fake files cannot match
    monkeypatch.setattr(fm.urllib.request, "urlopen", urlopen)
    with pytest.raises(ValueError, match="MD5"):
        load_fashion_mnist(tmp_path / "empty")
    assert not list((tmp_path / "cache" / "fashion-mnist").glob("*.gz"))


def test_official_checksums_are_the_published_ones():
    # Published in github.com/zalandoresearch/fashion-mnist (README, "MD5 Checksum" column).
    assert fm.FILES["train-images-idx3-ubyte"] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert fm.FILES["t10k-labels-idx1-ubyte"] == "bb300cfdad3c16e7a12a480ee83cd310"


def test_cifar10_python_format(tmp_path):
    write_cifar10(tmp_path, 20)
    train, test = load_cifar(10, tmp_path)
    assert train.x.shape == (100, 3, 32, 32) and test.x.shape == (20, 3, 32, 32)
    x, y = make_images(20, 32, 3, 10, 0)
    assert torch.equal(train.x[:20], torch.from_numpy(x)) and train.classes[3] == "c3"
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar(100, tmp_path / "nothing")


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                value = 30 if c == "cat" else 220
                Image.new("RGB", (40, 48), (value, value, value)).save(tmp_path / split / c / f"{i}.png")
    train, test = load_imagefolder(tmp_path, image_size=16)
    assert train.classes == ["cat", "dog"] and len(train) == 6 and len(test) == 6
    x, y = train[[0, 5]]
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.uint8
    assert y.tolist() == [0, 1] and int(x[0].max()) == 30 and int(x[1].min()) == 220
    data = load_dataset("imagefolder", tmp_path, image_size=16, val_fraction=1 / 3)
    assert (len(data.train), len(data.val), data.num_classes, data.in_channels) == (4, 2, 2, 3)


def test_split_is_fixed_disjoint_and_complete():
    a_train, a_val = train_val_split(100, 0.2, seed=0)
    b_train, b_val = train_val_split(100, 0.2, seed=0)
    assert torch.equal(a_val, b_val) and len(a_val) == 20
    assert sorted(torch.cat([a_train, a_val]).tolist()) == list(range(100))
    assert not torch.equal(train_val_split(100, 0.2, seed=1)[1], a_val)
    with pytest.raises(ValueError, match="val_fraction=1.0"):
        train_val_split(10, 1.0)


def test_load_dataset_fashion(tmp_path, no_system_data):
    write_fashion_mnist(tmp_path, 100, 30)
    data = load_dataset("fashion-mnist", tmp_path, val_fraction=0.2, train_subset=50, download=False)
    assert (len(data.train), len(data.val), len(data.test)) == (50, 20, 30)
    assert data.small_input and data.input_size == (28, 28) and data.in_channels == 1
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_dataset("mnist")


def test_mnist1d_generated_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("DYCONV_CACHE", str(tmp_path))
    state = np.random.get_state()[1].copy()
    from dyconv.data import load_mnist1d

    train, test = load_mnist1d(num_samples=200)
    assert train.x.shape == (160, 1, 40) and test.x.shape == (40, 1, 40) and train.x.dtype == torch.float32
    assert set(train.y.tolist()) <= set(range(10))
    assert np.array_equal(np.random.get_state()[1], state)  # the global numpy stream is untouched
    again, _ = load_mnist1d(num_samples=200)  # from the cache file
    assert torch.equal(again.x, train.x) and len(list(tmp_path.glob("mnist1d-*.npz"))) == 1


def test_normalize():
    x = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    assert torch.allclose(normalize(x, (0.5,), (0.5,)), torch.tensor([[[[-1.0, 1.0]]]]))


def test_random_crop_matches_padded_slice():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) + 1
    g = torch.Generator().manual_seed(3)
    out = random_crop(x, 2, g)
    g = torch.Generator().manual_seed(3)
    oy, ox = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        assert torch.equal(out[i], padded[i, :, oy[i]:oy[i] + 4, ox[i]:ox[i] + 4])
    assert torch.equal(random_crop(x, 0, g), x)


def test_random_flip():
    x = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 1, 1, 3)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == x[:, 0, 0, 2])
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])
    assert 10 < int(flipped.sum()) < 54


def test_loader_order_depends_on_seed_and_epoch_only(tmp_path, no_system_data):
    write_fashion_mnist(tmp_path, 64, 16)
    data = load_dataset("fashion-mnist", tmp_path, val_fraction=0.0, download=False)

    def labels(seed, epoch, rank=0, world=1):
        loader = BatchLoader(data.train, 8, data.mean, data.std, train=True, augment=data.augment, seed=seed,
                             rank=rank, world_size=world)
        loader.set_epoch(epoch)
        return [(x, y) for x, y in loader]

    a, b = labels(0, 1), labels(0, 1)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in labels(0, 2)]))
    r0, r1 = labels(0, 1, 0, 2), labels(0, 1, 1, 2)
    assert len(r0) == len(r1) == 4


def test_eval_loader_shards_count_every_sample_once(tmp_path, no_system_data):
    write_fashion_mnist(tmp_path, 10, 13)
    data = load_dataset("fashion-mnist", tmp_path, val_fraction=0.0, download=False)
    seen = []
    for rank in range(3):
        loader = BatchLoader(data.test, 4, data.mean, data.std, train=False, rank=rank, world_size=3)
        seen += [x for x, _ in loader]
    assert sum(len(x) for x in seen) == 13
    whole = torch.cat([x for x, _ in BatchLoader(data.test, 100, data.mean, data.std, train=False)])
    assert torch.equal(torch.cat(seen).sort(0).values, whole.sort(0).values)
