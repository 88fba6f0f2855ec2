import json
import statistics

import pytest

from dyconv.benchmark import COLUMNS, LayerShape
from dyconv.benchmark_launches import combine_launches, format_spread, run_launches
from dyconv.cli import main


def _row(name, ratio, fmt, implementation="dyconv"):
    row = {column: 0.0 for column in COLUMNS}
    row.update(kind="layer", name=name, implementation=implementation)
    for figure in ("b1", "batch", "train"):
        row[f"{figure}_format"] = row[f"{figure}_static_format"] = fmt
    row.update(b1_ratio=ratio, batch_ratio=2 * ratio, train_ratio=3 * ratio, memory_ratio=1.0, b1_static_ms=ratio)
    return row


def test_combine_launches_takes_medians_and_the_most_chosen_format():
    runs = [[_row("a", 1.0, "contiguous"), _row("b", 5.0, "channels_last")],
            [_row("b", 4.0, "contiguous"), _row("a", 3.0, "channels_last")],  # another order: matched by name
            [_row("a", 2.0, "channels_last"), _row("b", 9.0, "contiguous")]]
    a, b = combine_launches(runs)
    assert (a["name"], b["name"]) == ("a", "b")  # the first run's order
    assert (a["b1_ratio"], a["batch_ratio"], a["train_ratio"], a["b1_static_ms"]) == (2.0, 4.0, 6.0, 2.0)
    assert (b["b1_ratio"], b["batch_ratio"]) == (5.0, 10.0)
    assert a["b1_format"] == "channels_last" and b["b1_format"] == "contiguous"
    assert set(a) == set(COLUMNS)
    spread = format_spread(runs)
    assert "| a | dyconv | 1.00–3.00× | 2.00–6.00× | 3.00–9.00× | 1.00–1.00× |" in spread
    assert "| b | dyconv | 4.00–9.00× |" in spread


def test_combine_launches_ties_go_to_the_earliest_run():
    runs = [[_row("a", 1.0, "channels_last")], [_row("a", 2.0, "contiguous")]]
    assert combine_launches(runs)[0]["train_format"] == "channels_last"
    assert combine_launches(runs)[0]["b1_ratio"] == 1.5


def test_combine_launches_rejects_runs_with_other_rows():
    with pytest.raises(ValueError, match="run 2 holds other rows"):
        combine_launches([[_row("a", 1.0, "contiguous")], [_row("b", 1.0, "contiguous")]])
    with pytest.raises(ValueError, match="at least one run"):
        combine_launches([])
    with pytest.raises(ValueError, match="launches must be at least 1. Received: 0"):
        run_launches(0, layers=[], networks=[], verbose=False)


def test_runs_in_fresh_processes_combined(tmp_path):
    path = tmp_path / "b.json"
    rows = run_launches(2, layers=[LayerShape("tiny", 4, 6, 3, 8)], networks=[], batch_size=2, repeats=1,
                        naive=False, verbose=False, csv_path=str(tmp_path / "b.csv"), json_path=str(path))
    data = json.loads(path.read_text())
    assert data["meta"]["launches"] == 2 and len(data["launch_rows"]) == 2
    assert data["rows"] == rows and [r["name"] for r in rows] == ["tiny"]
    for column in ("b1_ratio", "batch_ratio", "train_ratio", "memory_ratio", "train_static_ms"):
        assert rows[0][column] == statistics.median(run[0][column] for run in data["launch_rows"])
    assert (tmp_path / "b.csv").read_text().splitlines()[0].split(",") == list(COLUMNS)


def test_cli_launches(tmp_path, capsys):
    assert main(["bench", "--layers", "tiny-no-such-layer", "--networks", "--launches", "2", "--repeats", "1",
                 "--csv", "", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "run 2 of 2 (a fresh process)" in out and "medians over 2 runs" in out
    assert json.loads((tmp_path / "b.json").read_text())["launch_rows"] == [[], []]
