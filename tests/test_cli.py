import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dyconv.cli import build_parser, main
from dyconv.cli.train import config_from_args
from dyconv.data import fashion_mnist as fm
from fakedata import write_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system")
    monkeypatch.setenv("DYCONV_CACHE", str(tmp_path / "cache"))
    return write_fashion_mnist(tmp_path / "fm", 96, 40)


def test_config_file_gives_defaults_and_options_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: dy_resnet10\nepochs: 7\nlr: 0.05\nweight-decay: 0.001\nmodel_kwargs: {num_experts: 2}\n")
    args = build_parser().parse_args(["train", "--config", str(cfg), "--lr", "0.2", "--model-kwargs", "reduction=8",
                                      "--temperature", "30:1:5", "--no-progress"])
    config = config_from_args(args)
    assert (config.model, config.epochs, config.lr, config.weight_decay) == ("dy_resnet10", 7, 0.2, 0.001)
    assert config.model_kwargs == {"num_experts": 2, "reduction": 8}
    assert config.temperature == "30:1:5" and config.progress is False and config.batch_size == 128


def test_bad_options_are_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        config_from_args(build_parser().parse_args(["train", "--config", str(cfg)]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--dataset", "mnist"])


models = pytest.importorskip("dyconv.models", reason="needs the model registry")


def test_train_eval_plot_round_trip(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--no-download"]
    assert main(["train", "--model", "dy_mobilenetv2_035", *common, "--epochs", "2", "--batch-size", "16",
                 "--lr", "0.05", "--seed", "1", "--output", str(out), "--model-kwargs", "small_input=false",
                 "num_experts=2", "--limit-train-batches", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert f"test top-1 {100 * results['test_acc']:.2f}%" in printed
    assert results["model_kwargs"]["num_experts"] == 2 and results["model_kwargs"]["small_input"] is False
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert "model: dy_mobilenetv2_035" in (out / "config.yaml").read_text()

    assert main(["eval", "--checkpoint", str(out / "checkpoint"), *common[:4]]) == 0
    assert f"test top-1 {100 * results['test_acc']:.2f}%" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out), *common[:4], "--attention", "uniform"]) == 0
    assert "(40 samples)" in capsys.readouterr().out

    assert main(["plot", str(out), "--output", str(tmp_path / "plots")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["attention_entropy.png", "attention_per_class.png", "curves.png"]
    assert all((tmp_path / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


@pytest.mark.slow
def test_torchrun_two_processes_from_the_command_line(data_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dyconv",
         "train", "--model", "dy_mobilenetv2_035", "--dataset", "fashion-mnist", "--data-dir", str(data_dir),
         "--no-download", "--epochs", "1", "--batch-size", "8", "--output", str(out), "--model-kwargs",
         "small_input=false", "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("test top-1") == 1  # rank 0 only
    assert "2 process(es)" in proc.stdout
    assert json.loads((out / "results.json").read_text())["test_samples"] == 40


@pytest.mark.slow
def test_demo_quick_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system")
    monkeypatch.setenv("DYCONV_CACHE", str(tmp_path / "cache"))
    data_dir = write_fashion_mnist(tmp_path / "fm", 300, 40)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out), "--data-dir", str(data_dir), "--train-subset", "256",
                 "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["model"] for r in summary["rows"]] == ["mobilenetv2_035", "dy_mobilenetv2_035"]
    assert summary["rows"][1]["params"] > summary["rows"][0]["params"]
    assert summary["rows"][0]["latency_b1_ratio"] == 1.0
    assert len(summary["plots"]) == 3
