"""Smoke runs of the benchmark code (tiny shapes, one repeat; no timing thresholds) and its naive baseline."""

import copy
import csv
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dyconv import DynamicConv2d
from dyconv.benchmark import (COLUMNS, LayerShape, NaiveDynamicConv2d, build_network, naive_model,
                              _train, peak_training_memory, run_benchmark, training_memory_with_workspaces)
from dyconv.cli import main
from reference import TOL, per_sample_reference


def test_naive_baseline_computes_the_same_numbers():
    layer = DynamicConv2d(4, 6, 3, stride=2, padding=1, groups=2, dtype=torch.float64)
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(NaiveDynamicConv2d(layer)(x), per_sample_reference(layer, x), **TOL[torch.float64])


def test_naive_model_wraps_every_dynamic_layer():
    model = torch.nn.Sequential(DynamicConv2d(3, 4, 3), torch.nn.Sequential(DynamicConv2d(4, 4, 1)))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    naive = naive_model(copy.deepcopy(model))
    assert isinstance(naive[0], NaiveDynamicConv2d) and isinstance(naive[1][0], NaiveDynamicConv2d)
    torch.testing.assert_close(naive(x), expected, **TOL[torch.float32])


def test_peak_memory_sees_cpu_allocations():
    def step():
        a = torch.ones(1 << 20)  # 4 MiB
        b = a * 2  # another 4 MiB live at the same time
        del a, b

    assert peak_training_memory(step) >= 8 << 20
    assert peak_training_memory(lambda: None) < 1 << 20


def test_peak_memory_does_not_subtract_memory_from_before_the_step():
    # the profiler keeps the sizes of the blocks it saw in earlier sessions (such as the gradients of a profiled
    # training step, freed by the next step's zero_grad): a free of one inside the measured step must not lower
    # the step's own peak
    held = []
    with torch.profiler.profile(profile_memory=True):
        held.append(torch.ones(1 << 21))  # 8 MiB, allocated while profiled

    def step():
        held.clear()  # frees the 8 MiB from before the step
        a = torch.ones(1 << 20)
        b = a * 2  # the step's own 8 MiB
        del a, b

    assert 8 << 20 <= peak_training_memory(step) < 9 << 20


def test_identical_training_steps_read_identical_peaks():
    # each step frees the gradients of the one before (zero_grad(set_to_none=True)) at addresses the profiler may
    # have seen in an earlier reading: the reading must not depend on that
    torch.manual_seed(0)
    model = torch.nn.Sequential(DynamicConv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                DynamicConv2d(16, 16, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(16, 10))
    x, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = _train(model, x, lambda y: F.cross_entropy(y, labels), optimizer)
    readings = [training_memory_with_workspaces(step) for _ in range(4)]
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    assert readings[0] >= grads  # the gradients the step allocates count
    assert readings == [readings[0]] * 4


def test_layer_rows_and_files(tmp_path):
    rows = run_benchmark(layers=[LayerShape("tiny 3x3", 4, 6, 3, 8), LayerShape("tiny 1x1", 4, 6, 1, 8)],
                         networks=[], batch_size=2, repeats=1, verbose=False,
                         csv_path=str(tmp_path / "b.csv"), json_path=str(tmp_path / "b.json"))
    assert [(r["name"], r["implementation"]) for r in rows] == [
        ("tiny 3x3", "dyconv"), ("tiny 3x3", "naive"), ("tiny 1x1", "dyconv"), ("tiny 1x1", "naive")]
    for r in rows:
        assert set(r) == set(COLUMNS)
        assert all(r[k] > 0 for k in ("b1_ratio", "batch_ratio", "train_ratio", "memory_ratio"))
        for figure in ("b1", "batch", "train"):
            assert r[f"{figure}_format"] in ("contiguous", "channels_last")
            assert r[f"{figure}_static_format"] in ("contiguous", "channels_last")
        if r["implementation"] == "naive":
            assert r["train_format"] == "contiguous"  # the naive side runs as its authors wrote it
    with open(tmp_path / "b.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["meta"]["batch_size"] == 2 and len(data["rows"]) == 4
    assert data["meta"]["device"] == "cpu"


def test_network_pair_shapes():
    static, dynamic = build_network("resnet18")
    convs = [m for m in static.modules() if isinstance(m, torch.nn.Conv2d)]
    dynamic_layers = [m for m in dynamic.modules() if isinstance(m, DynamicConv2d)]
    assert len(dynamic_layers) == len(convs) - 1  # every convolution but the stem
    assert isinstance(dynamic.conv1, torch.nn.Conv2d)
    with pytest.raises(ValueError, match="'vgg'"):
        build_network("vgg")


@pytest.mark.slow
def test_cli_network_smoke(tmp_path):
    assert main(["bench", "--layers", "--networks", "resnet18", "mobilenet_v2", "--repeats", "1",
                 "--batch-size", "2", "--image-size", "64", "--train-image-size", "32",
                 "--csv", str(tmp_path / "n.csv"), "--json", ""]) == 0
    with open(tmp_path / "n.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["resnet18", "resnet18", "mobilenet_v2", "mobilenet_v2"]


def test_each_side_counts_its_faster_format_timed_in_the_same_rounds(monkeypatch):
    import dyconv.benchmark as bench

    sides = {"a": bench._Side(torch.nn.Identity(), bench.FORMATS), "b": bench._Side(torch.nn.Identity(), bench.FORMATS)}
    calls = []
    runners = {name: {fmt: (lambda name=name, fmt=fmt: calls.append((name, fmt))) for fmt in bench.FORMATS}
               for name in sides}
    # interleaved: one call of every side and format per round (a warm-up round, then three timed ones)
    bench._timed_in_best_format(sides, "batch", runners, repeats=3)
    assert calls == [("a", "contiguous"), ("a", "channels_last"), ("b", "contiguous"), ("b", "channels_last")] * 4
    # each side's figure is its faster format's median, and that format is recorded
    medians = {("a", "contiguous"): 2.0, ("a", "channels_last"): 1.0, ("b", "contiguous"): 3.0,
               ("b", "channels_last"): 4.0}
    monkeypatch.setattr(bench, "interleaved_medians", lambda fns, repeats, settle=0, faults=None: medians)
    assert bench._timed_in_best_format(sides, "train", runners, repeats=3) == {"a": 1.0, "b": 3.0}
    assert sides["a"].chosen["train"] == "channels_last" and sides["b"].chosen["train"] == "contiguous"


def test_page_faults_counted_per_call_and_allocator_environment_recorded(monkeypatch, tmp_path):
    import dyconv.benchmark as bench

    if bench.allocator_environment() or bench.page_faults() == 0:
        pytest.skip("the allocator is configured (fresh memory may be reused) or the platform counts no faults")
    # In a fresh process (here, earlier tests may have left free blocks this large in the heap), 64 MiB is above
    # glibc's largest mmap threshold (32 MiB): every call maps fresh pages and touches them all.
    code = ("from dyconv.benchmark import interleaved_medians; import torch; faults = {}; "
            "interleaved_medians({'fresh': lambda: torch.ones(16 * 2**20), 'none': lambda: None}, repeats=3, "
            "faults=faults); print(faults['fresh'], faults['none'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    fresh, none = map(float, out.split()[-2:])
    assert fresh >= 32  # at least one fault per 2 MiB even with transparent huge pages
    assert none < fresh
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    rows = run_benchmark(layers=[LayerShape("tiny 1x1", 4, 6, 1, 8)], networks=[], batch_size=2, repeats=1,
                         naive=False, verbose=False, json_path=str(tmp_path / "b.json"))
    meta = json.loads((tmp_path / "b.json").read_text())["meta"]
    assert meta["allocator_environment"] == {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}
    assert all(rows[0][f"{figure}_page_faults"] >= 0 for figure in bench.FIGURES)
    assert "tiny 1x1" in bench.format_page_faults(rows)


def test_dense_layer_shapes_are_the_ungrouped_stride_1_kxk_ones():
    from dyconv.benchmark import dense_layer_shapes

    assert [s.name for s in dense_layer_shapes(["3x3"])] == ["3x3 64->64 @56", "3x3 256->256 @14", "3x3 512->512 @7"]
    assert [s.name for s in dense_layer_shapes(["512", "dw3x3 576"])] == ["3x3 512->512 @7"]
    assert dense_layer_shapes(["dw3x3", "1x1"]) == []


def test_dense_benchmark_shapes_exit_where_nothing_can_be_timed(monkeypatch):
    import argparse

    from dyconv import _cpu_kernel
    from dyconv.benchmark import dense_benchmark_shapes

    parser = argparse.ArgumentParser()
    monkeypatch.setattr(_cpu_kernel, "available", lambda: True)
    assert [s.name for s in dense_benchmark_shapes(parser, ["512"])] == ["3x3 512->512 @7"]
    with pytest.raises(SystemExit):
        dense_benchmark_shapes(parser, ["dw3x3"])  # no dense shape matches
    monkeypatch.setattr(_cpu_kernel, "available", lambda: False)
    with pytest.raises(SystemExit, match="not available"):
        dense_benchmark_shapes(parser, ["512"])
