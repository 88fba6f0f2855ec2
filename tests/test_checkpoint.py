import json

import pytest
import torch
from torch import nn

import dyconv
from dyconv.checkpoint import (CheckpointError, load_model, load_state_dict, load_training_state, read_manifest,
                               save_checkpoint)


def tiny(name, *, num_classes=3, in_channels=1, num_experts=2):
    """A stand-in model builder with ``create_model``'s calling convention."""
    if name != "tiny_dy":
        raise ValueError(f"unknown model {name!r}")
    return nn.Sequential(
        dyconv.DynamicConv2d(in_channels, 4, 3, padding=1, num_experts=num_experts), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


KWARGS = {"num_classes": 3, "in_channels": 1, "num_experts": 2}


@pytest.fixture
def saved(tmp_path):
    model = tiny("tiny_dy", **KWARGS)
    dyconv.set_temperature(model, 7.0)
    model(torch.randn(4, 1, 8, 8))  # moves BatchNorm running statistics away from their initial values
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    state = {"epoch": 3, "optimizer": opt.state_dict(), "python_rng": (3, (1, 2, 3), None)}
    path = save_checkpoint(tmp_path / "run" / "checkpoint", model, model_name="tiny_dy", model_kwargs=KWARGS,
                           training_state=state, extra={"note": "x"})
    return model, path


def test_round_trip_rebuilds_model_with_weights_and_temperature(saved):
    model, path = saved
    loaded = load_model(path, create_model=tiny)
    assert not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2
        assert torch.equal(a, b), k
    assert dyconv.get_temperature(loaded) == 7.0
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), loaded(x))


def test_path_forms(saved):
    model, path = saved
    for p in (path, path.parent, path / "model.safetensors", path / "manifest.json"):
        assert dyconv.get_temperature(load_model(p, create_model=tiny)) == 7.0
    _, manifest = read_manifest(path.parent)
    assert manifest["model"] == "tiny_dy" and manifest["model_kwargs"] == KWARGS and manifest["extra"] == {"note": "x"}


def test_training_state_round_trip(saved):
    model, path = saved
    state = load_training_state(path)
    assert state["epoch"] == 3
    assert state["python_rng"] == (3, (1, 2, 3), None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(state["optimizer"])
    assert len(opt.state) == len(list(model.parameters()))


def test_truncated_weights_refused(saved):
    _, path = saved
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path, create_model=tiny)


def test_corrupted_weights_refused(saved):
    _, path = saved
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # same size, one flipped byte inside a tensor
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_state_dict(path)


def test_corrupted_training_state_refused(saved):
    _, path = saved
    file = path / "training_state.pt"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="training_state.pt"):
        load_training_state(path)


def test_missing_and_foreign(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope", create_model=tiny)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="manifest.json"):
        load_model(tmp_path / "empty", create_model=tiny)
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(path, create_model=tiny)
    (path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a dyconv checkpoint"):
        load_model(path, create_model=tiny)


def test_overwrite_replaces_atomically_and_leaves_no_temporaries(saved):
    model, path = saved
    dyconv.set_temperature(model, 2.0)
    save_checkpoint(path, model, model_name="tiny_dy", model_kwargs=KWARGS)
    assert dyconv.get_temperature(load_model(path, create_model=tiny)) == 2.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint"]
    with pytest.raises(CheckpointError, match="no training state"):
        load_training_state(path)


def test_interrupted_swap_falls_back_to_previous(saved):
    # A crash between "move old aside" and "move new into place" leaves only checkpoint.old.
    _, path = saved
    path.rename(path.with_name("checkpoint.old"))
    assert dyconv.get_temperature(load_model(path.parent, create_model=tiny)) == 7.0
    assert dyconv.get_temperature(load_model(path, create_model=tiny)) == 7.0


def test_failed_save_keeps_previous(saved, monkeypatch):
    model, path = saved

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, model_name="tiny_dy", model_kwargs=KWARGS, training_state={"epoch": 4})
    assert load_training_state(path)["epoch"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint"]


def test_non_json_kwargs_rejected(tmp_path):
    with pytest.raises(TypeError, match="model_kwargs"):
        save_checkpoint(tmp_path / "c", tiny("tiny_dy"), model_name="tiny_dy", model_kwargs={"f": object()})
