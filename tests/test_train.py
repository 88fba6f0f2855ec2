import json

import pytest
import torch
from torch import nn

import dyconv
from dyconv.checkpoint import load_model, load_state_dict
from dyconv.data import fashion_mnist as fm
from dyconv.train import (TrainConfig, attention_statistics, evaluate, evaluate_checkpoint, fit, parse_kwargs,
                          parse_temperature, uniform_attention)
from dyconv.train.optim import warmup_cosine
from fakedata import state_dicts_equal, tiny_model, write_fashion_mnist


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system")
    monkeypatch.setenv("DYCONV_CACHE", str(tmp_path / "cache"))
    return write_fashion_mnist(tmp_path / "fm", 160, 64)


def recipe(data_dir, output, **kw):
    base = dict(model="dy_tiny", dataset="fashion-mnist", data_dir=str(data_dir), output=str(output), epochs=4,
                batch_size=16, lr=0.05, warmup_epochs=1, seed=3, val_fraction=0.2, progress=False,
                download=False, model_kwargs={"dropout": 0.2})  # dropout: the global torch RNG must be restored
    base.update(kw)
    return TrainConfig(**base)


def test_resume_is_bit_identical(data_dir, tmp_path):
    full = fit(recipe(data_dir, tmp_path / "full"), create_model=tiny_model)
    first = fit(recipe(data_dir, tmp_path / "split", stop_after=2), create_model=tiny_model)
    assert not first["finished"] and "test_acc" not in first and first["epochs_done"] == 2
    second = fit(recipe(data_dir, tmp_path / "split", resume=True), create_model=tiny_model)
    assert second["finished"]
    assert state_dicts_equal(load_state_dict(tmp_path / "full"), load_state_dict(tmp_path / "split"))
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("epoch_time_s", "samples_per_s")} for e in h]
    assert strip(full["history"]) == strip(second["history"])
    assert full["test_acc"] == second["test_acc"] and full["test_loss"] == second["test_loss"]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    # The run differs from a different seed (so the equality above is not vacuous).
    other = fit(recipe(data_dir, tmp_path / "other", seed=4, epochs=1), create_model=tiny_model)
    assert other["history"][0]["train_loss"] != full["history"][0]["train_loss"]


def test_run_folder_contents_and_learning(data_dir, tmp_path):
    out = tmp_path / "run"
    r = fit(recipe(data_dir, out, epochs=6, lr=0.1, model_kwargs={}), create_model=tiny_model)
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoint", "results.json",
                                               "attention.json"}
    assert r["history"][-1]["train_loss"] < r["history"][0]["train_loss"]
    assert r["test_samples"] == 64 and r["train_samples"] == 128
    assert r["params"] == sum(p.numel() for p in tiny_model("dy_tiny", num_classes=10, in_channels=1).parameters())
    # 6 epochs < 10: the default anneals 30 -> 1 over half the run, then holds 1.
    temps = [h["temperature"] for h in r["history"]]
    assert temps[0] == pytest.approx(30 - 29 / 3) and temps[2:] == [1.0] * 4
    # eval of the saved checkpoint reproduces the final test numbers
    e = evaluate_checkpoint(out, "fashion-mnist", data_dir=str(data_dir), val_fraction=0.2, create_model=tiny_model)
    assert e["acc"] == pytest.approx(r["test_acc"]) and e["loss"] == pytest.approx(r["test_loss"], rel=1e-5)
    model = load_model(out, create_model=tiny_model)
    assert dyconv.get_temperature(model) == 1.0
    att = json.loads((out / "attention.json").read_text())
    assert att["samples"] == 64 and len(att["layers"]) == 1 and len(att["layers"][0]["per_class"]) == 10


def test_existing_output_and_changed_recipe_refused(data_dir, tmp_path):
    fit(recipe(data_dir, tmp_path / "r", epochs=2, stop_after=1), create_model=tiny_model)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        fit(recipe(data_dir, tmp_path / "r", epochs=2), create_model=tiny_model)
    with pytest.raises(ValueError, match="lr=0.2"):
        fit(recipe(data_dir, tmp_path / "r", epochs=2, lr=0.2, resume=True), create_model=tiny_model)


def test_static_model_adamw_label_smoothing_bf16(data_dir, tmp_path):
    r = fit(recipe(data_dir, tmp_path / "s", model="tiny", epochs=1, optimizer="adamw", lr=1e-3,
                   label_smoothing=0.1, amp=True, limit_train_batches=3), create_model=tiny_model)
    assert r["temperature"] is None and not (tmp_path / "s" / "attention.json").exists()
    assert r["history"][0]["samples_per_s"] > 0 and torch.isfinite(torch.tensor(r["test_loss"]))


def test_temperature_parsing():
    assert parse_temperature("30:1:10", 100) == (30.0, 1.0, 10.0)
    assert parse_temperature(None, 100) == (30.0, 1.0, 10.0)
    assert parse_temperature(None, 4) == (30.0, 1.0, 2.0)
    assert parse_temperature("10:2", 6) == (10.0, 2.0, 3.0)
    assert parse_temperature("1", 6) == (1.0, 1.0, 0.0)
    for bad in ("a:b", "0:1:3", "30:1:2:4", "-1"):
        with pytest.raises(ValueError, match="temperature"):
            parse_temperature(bad, 10)


def test_config_validation_and_kwargs():
    with pytest.raises(ValueError, match="epochs=0"):
        TrainConfig(model="x", epochs=0)
    with pytest.raises(ValueError, match="Unknown training option"):
        TrainConfig.from_dict({"model": "x", "learning_rate": 1})
    assert parse_kwargs(["num_experts=2", "small_input=false", "name=abc"]) == {
        "num_experts": 2, "small_input": False, "name": "abc"}
    with pytest.raises(ValueError, match="key=value"):
        parse_kwargs(["num_experts"])


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[6] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 8)).item()))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_evaluate_counts():
    class Fixed(nn.Module):
        def forward(self, x):  # predicts class 0 for every sample, with logits (log 3, 0, 0)
            return torch.tensor([[torch.log(torch.tensor(3.0)), 0.0, 0.0]]).expand(x.shape[0], 3)

    batches = [(torch.zeros(2, 1), torch.tensor([0, 1])), (torch.zeros(2, 1), torch.tensor([0, 0]))]
    r = evaluate(Fixed(), batches)
    # p(class 0) = 3/5, p(others) = 1/5: three samples at -log(3/5), one at -log(1/5)
    expected = (3 * -torch.log(torch.tensor(0.6)) - torch.log(torch.tensor(0.2))) / 4
    assert r["acc"] == 0.75 and r["samples"] == 4 and r["loss"] == pytest.approx(float(expected), rel=1e-6)


def test_uniform_attention_is_the_averaged_kernel():
    layer = dyconv.DynamicConv2d(3, 5, 3, padding=1, num_experts=4)
    x = torch.randn(2, 3, 6, 6)
    with uniform_attention(layer) as n:
        assert n == 1
        got = layer(x)
        assert torch.allclose(layer.attention(x), torch.full((2, 4), 0.25))
    expected = torch.nn.functional.conv2d(x, layer.weight.mean(0), layer.bias.mean(0), padding=1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(layer(x), expected, atol=1e-5)  # hooks removed on exit


def test_attention_statistics_of_uniform_and_one_hot():
    layer = dyconv.DynamicConv2d(2, 2, 1, num_experts=4)
    model = nn.Sequential(layer)
    batches = [(torch.randn(6, 2, 3, 3), torch.tensor([0, 1, 1, 2, 2, 2]))]
    with uniform_attention(model):
        s = attention_statistics(model, batches, num_classes=3)
    entry = s["layers"][0]
    assert s["samples"] == 6 and entry["normalized_entropy"] == pytest.approx(1.0)
    assert torch.allclose(torch.tensor(entry["per_class"], dtype=torch.float64), torch.full((3, 4), 0.25, dtype=torch.float64))
    with torch.no_grad():
        layer.router.fc2.weight.zero_()
        layer.router.fc2.bias.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))
    dyconv.set_temperature(model, 1.0)  # at the initial 30 the logit 100 would not yet be one-hot
    entry = attention_statistics(model, batches, num_classes=3)["layers"][0]
    assert entry["entropy"] == pytest.approx(0.0, abs=1e-6) and entry["mean"] == pytest.approx([0, 0, 1, 0])


def test_uniform_attention_matches_average_experts_on_a_registry_model():
    # Two independent implementations of "attention off": router hooks here, kernel averaging in dyconv.convert.
    model = dyconv.create_model("dy_cnn1d", num_classes=10, in_channels=1).eval()
    x = torch.randn(3, 1, 40)
    with uniform_attention(model) as n:
        assert n == 2
        got = model(x)
    assert torch.allclose(got, dyconv.average_experts(model)(x), atol=1e-5)
