"""benchmarks/strategies.py: a row per shape and figure with a ratio for every strategy that applies, in the format
asked for."""

import torch

import benchmark_scripts

strategies = benchmark_scripts.load("strategies")


def test_main_prints_a_row_per_shape_and_figure(capsys):
    threads = torch.get_num_threads()
    try:
        strategies.main(["--layers", "1x1 project 144", "--sizes", "2", "3", "--batch", "2", "--repeats", "1",
                         "--train", "--format", "channels_last", "--settle", "1", "--strategies", "chunked",
                         "experts", "depthwise_kernel"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert "channels_last" in lines[0]
    rows = [line.split(" | ") for line in lines[3:]]
    name = "| 1x1 project 144->24"
    assert [(r[0], r[1]) for r in rows] == [(f"{name} @{size}", figure) for size in (2, 3)
                                            for figure in ("inference", "train")]
    for r in rows:
        assert all(cell.endswith("×") for cell in r[3:6])  # auto, chunked, experts
        assert r[6] == "— |"  # the depthwise kernel does not apply
