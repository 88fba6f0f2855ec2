"""The benchmark run several times, each run in a fresh process, and the runs' figures combined.

One run of :func:`dyconv.benchmark.run_benchmark` interleaves the sides, so a slow spell of the machine hits them
alike; but a whole run keeps the state its process happens to reach (how the allocator has laid out its heap, which
blocks it maps afresh and so how many page faults each call takes, README "Page faults"), and on a virtual machine
that state moves every figure of the run together. Runs one after the other have differed by more than most
effects we measure (DY-ResNet-18 at batch 1: 1.23x and 1.51x static; DY-MobileNetV2 1.38x to 1.64x in three runs;
README, "Runs in fresh processes"). So
:func:`run_launches` starts ``launches`` runs one after the other (never two at a time), each in its own Python
process with the same options, and reports every cell as the median over the runs, with each ratio's range.

Example:
    >>> from dyconv.benchmark import LayerShape
    >>> from dyconv.benchmark_launches import run_launches
    >>> rows = run_launches(3, layers=[LayerShape("tiny", 4, 4, 3, 8)], networks=[], batch_size=2, repeats=1,
    ...                     verbose=False)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict

from .benchmark import COLUMNS, format_table, write_results

KEY = ("kind", "name", "implementation")
FORMAT_COLUMNS = tuple(c for c in COLUMNS if c.endswith("_format"))
NUMBER_COLUMNS = tuple(c for c in COLUMNS if c not in KEY and c not in FORMAT_COLUMNS)
RATIOS = ("b1_ratio", "batch_ratio", "train_ratio", "memory_ratio")

_CHILD = """
import json, sys
from dyconv.benchmark import LayerShape, run_benchmark
options = json.loads(sys.argv[1])
if options.get("layers") is not None:
    options["layers"] = [LayerShape(**shape) for shape in options["layers"]]
run_benchmark(**options)
"""


def combine_launches(launches: Sequence[Sequence[dict]]) -> list[dict]:
    """One row per (kind, name, implementation), in the first run's order: every number the median over the runs
    (a ratio's median, not the ratio of the medians), every memory format the one most runs chose (ties: the
    earliest run's). Every run must hold the same rows."""
    if not launches:
        raise ValueError("combine_launches needs at least one run. Received: no runs")
    keys = [tuple(row[k] for k in KEY) for row in launches[0]]
    by_key = []
    for i, rows in enumerate(launches):
        indexed = {tuple(row[k] for k in KEY): row for row in rows}
        if sorted(indexed) != sorted(keys) or len(indexed) != len(rows):
            raise ValueError(f"run {i + 1} holds other rows than run 1. Received: {sorted(indexed)} against "
                             f"{sorted(keys)}")
        by_key.append(indexed)
    combined = []
    for key in keys:
        rows = [indexed[key] for indexed in by_key]
        row = dict(zip(KEY, key))
        for column in NUMBER_COLUMNS:
            row[column] = statistics.median(r[column] for r in rows)
        for column in FORMAT_COLUMNS:
            row[column] = Counter(r[column] for r in rows).most_common(1)[0][0]
        combined.append({column: row[column] for column in COLUMNS})
    return combined


def format_spread(launches: Sequence[Sequence[dict]]) -> str:
    """A Markdown table of each ratio's range over the runs (lowest–highest), rows in the first run's order."""
    lines = ["| shape / network | impl. | batch 1 | batch | train step | train peak memory |",
             "|---|---|---|---|---|---|"]
    for row in launches[0]:
        key = tuple(row[k] for k in KEY)
        same = [r for rows in launches for r in rows if tuple(r[k] for k in KEY) == key]
        cells = [f"{min(r[c] for r in same):.2f}–{max(r[c] for r in same):.2f}×" for c in RATIOS]
        lines.append(f"| {row['name']} | {row['implementation']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_launches(launches: int, *, verbose: bool = True, csv_path: str | None = None,
                 json_path: str | None = None, **options) -> list[dict]:
    """:func:`dyconv.benchmark.run_benchmark` with the keyword arguments ``options`` (its own; ``layers`` as
    :class:`dyconv.benchmark.LayerShape`) ``launches`` times, each run in a fresh process (one at a time; each
    prints its own table when ``verbose``), combined by :func:`combine_launches`; prints the combined table and the
    ranges when ``verbose`` and writes the combined rows to CSV/JSON (the JSON also holds every run's rows,
    ``launch_rows``, and the first run's meta with ``launches``). Returns the combined rows."""
    if launches < 1:
        raise ValueError(f"launches must be at least 1. Received: {launches}")
    if options.get("layers") is not None:
        options["layers"] = [asdict(s) for s in options["layers"]]
    if "device" in options:
        options["device"] = str(options["device"])
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    runs, meta = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(launches):
            if verbose:
                print(f"run {i + 1} of {launches} (a fresh process)", flush=True)
            path = os.path.join(tmp, f"run{i}.json")
            child = dict(options, verbose=verbose, csv_path=None, json_path=path)
            subprocess.run([sys.executable, "-c", _CHILD, json.dumps(child)], env=env, check=True)
            with open(path) as f:
                data = json.load(f)
            runs.append(data["rows"])
            meta = meta or data["meta"]
    rows = combine_launches(runs)
    if verbose:
        print()
        print(f"medians over {launches} runs, each in its own process:")
        print(format_table(rows, meta["batch_size"]))
        print()
        print(f"range of each ratio over the {launches} runs:")
        print(format_spread(runs))
    write_results(rows, csv_path, json_path, dict(meta, launches=launches), {"launch_rows": runs})
    return rows
