"""Distributed data parallel on CPU: two processes under torchrun (gloo), through the library's fit()."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dyconv.data import fashion_mnist as fm
from dyconv.train import evaluate_checkpoint
from fakedata import tiny_model, write_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import hashlib, json, os, sys
import torch
from fakedata import tiny_model
from dyconv.train import fit

built = []
def create(name, **kw):
    built.append(tiny_model(name, **kw))
    return built[-1]

r = fit(model="dy_tiny", dataset="fashion-mnist", data_dir=sys.argv[1], output=sys.argv[2], epochs=2, batch_size=8,
        lr=0.05, seed=1, val_fraction=0.25, progress=False, download=False, create_model=create)
digest = hashlib.sha256(b"".join(v.detach().numpy().tobytes() for v in built[0].state_dict().values())).hexdigest()
rank = int(os.environ["RANK"])
# one file per rank: the ranks share one stdout pipe, where their lines can interleave (a rank's result line was
# lost in CI twice, once after another rank's unterminated output, once entirely)
path = os.path.join(sys.argv[3], f"{rank}.json")
with open(path + ".tmp", "w") as f:
    json.dump({"rank": rank, "weights": digest, "val_acc": r["val_acc"], "test_acc": r["test_acc"],
               "test_samples": r["test_samples"]}, f)
os.replace(path + ".tmp", path)
"""


@pytest.mark.slow  # two torchrun processes: ~15 s on a quiet 2-core machine, 40+ s when loaded
def test_two_process_cpu_training(tmp_path, monkeypatch):
    data = write_fashion_mnist(tmp_path / "fm", 128, 50)
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
               DYCONV_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(data), str(tmp_path / "run"), str(results_dir)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((results_dir / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1]
    # DDP keeps the replicas identical, and the metrics are reduced over both shards (every test sample once).
    assert results[0]["weights"] == results[1]["weights"]
    assert results[0]["test_acc"] == results[1]["test_acc"] and results[0]["test_samples"] == 50
    # Only rank 0 writes: one log header, one line per epoch in metrics.jsonl.
    assert proc.stdout.count("dy_tiny on fashion-mnist") == 1
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert not list((tmp_path / "run").glob(".checkpoint.tmp-*"))
    # The reduced metrics equal a single-process evaluation of the saved weights.
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system")
    single = evaluate_checkpoint(tmp_path / "run", "fashion-mnist", data_dir=str(data), val_fraction=0.25,
                                 create_model=tiny_model)
    assert single["samples"] == 50 and abs(single["acc"] - results[0]["test_acc"]) < 1e-9
    val = evaluate_checkpoint(tmp_path / "run", "fashion-mnist", data_dir=str(data), split="val", val_fraction=0.25,
                              create_model=tiny_model)
    assert abs(val["acc"] - results[0]["val_acc"]) < 1e-9
