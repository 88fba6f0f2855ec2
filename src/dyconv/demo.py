"""``dyconv demo``: the static twin and its dynamic model, trained with the same recipe and seed, side by side.

Both models are built from the registry with the small-image stem, trained on Fashion-MNIST by
:func:`dyconv.train.fit` with identical settings (the DY model additionally anneals its temperature),
evaluated on the test set, profiled (parameters, MAdds) and timed on this machine. The table is printed
and written to ``summary.md``/``summary.json``; the plots go to ``plots/``.

Example:
    >>> from dyconv.demo import run_demo
    >>> summary = run_demo(output="runs/demo", quick=True)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .benchmark import _infer, interleaved_medians

# The recipe of the full demo: both models with the small-image stem (stride 1, so 28×28 images keep their
# resolution through the first stages: 12.8M MAdds per image for mobilenetv2_035, by dyconv.profile), 10 000
# training images (fixed-seed subset), 3 epochs; 3 000 validation images carved from the training set.
# Sized for about 15 minutes on a quiet 2-core CPU for both models (timing in the README).
# experiments/table.yaml's `fashion` recipe is the same, so the demo's runs are seed 0 of the results table.
DEMO_PAIR = ("mobilenetv2_035", "dy_mobilenetv2_035")
DEMO_RECIPE = dict(dataset="fashion-mnist", epochs=3, batch_size=128, lr=0.1, optimizer="sgd", weight_decay=5e-5,
                   warmup_epochs=0.3, label_smoothing=0.0, train_subset=10000, val_fraction=0.05, seed=0,
                   model_kwargs={"small_input": True})
# --quick: a ~2-minute smoke version of the same pipeline.
QUICK_RECIPE = dict(DEMO_RECIPE, epochs=1, train_subset=1000)


def _profile(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, float | None]:
    """Parameters and MAdds from ``dyconv.profile`` (which counts the dynamic layers' attention and
    aggregation); parameters are counted directly when it is unavailable."""
    try:
        from .profile import profile
    except ImportError:
        return {"params": sum(p.numel() for p in model.parameters()), "madds": None}
    info = profile(model, input_size)
    return {"params": info.params, "madds": info.madds}


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def compare(results: dict[str, dict[str, Any]], *, input_shape: tuple[int, ...], batch_sizes=(1, 64),
            create_model=None) -> list[dict[str, Any]]:
    """Rows of the side-by-side table for trained runs ``{name: fit results}`` (same dataset)."""
    from .checkpoint import load_model

    rows = []
    models = {name: load_model(r["output"], create_model=create_model) for name, r in results.items()}
    latency = {name: {} for name in models}
    for b in batch_sizes:
        example = torch.randn(b, *input_shape)
        # One call of each model in turn (load changes on a shared machine affect both alike), each timed after an
        # untimed call of its own (its own steady state, as `dyconv bench` does at batch 1); medians.
        fns = {name: _infer(model.eval(), example) for name, model in models.items()}
        medians = interleaved_medians(fns, repeats=30 if b == 1 else 10, warmup=2, settle=1)
        for name in models:
            latency[name][b] = medians[name]
    base = next(iter(models))
    for name, model in models.items():
        prof = _profile(model, (1, *input_shape))
        row = {"model": name, "test_acc": results[name].get("test_acc"), "params": prof["params"],
               "madds": prof["madds"], "train_time_s": results[name].get("train_time_s")}
        for b in batch_sizes:
            row[f"latency_b{b}_ms"] = 1000 * latency[name][b]
            row[f"latency_b{b}_ratio"] = latency[name][b] / latency[base][b]
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], batch_sizes=(1, 64)) -> str:
    """A markdown table of :func:`compare`'s rows."""
    head = ["model", "test top-1", "params", "MAdds"] + [f"latency b{b} (ratio)" for b in batch_sizes] + ["train time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = f"{100 * r['test_acc']:.2f}%" if r.get("test_acc") is not None else "n/a"
        cells = [r["model"], acc, _fmt_count(r["params"]), _fmt_count(r["madds"])]
        cells += [f"{r[f'latency_b{b}_ms']:.2f} ms ({r[f'latency_b{b}_ratio']:.2f}×)" for b in batch_sizes]
        cells.append(f"{r['train_time_s']:.0f} s" if r.get("train_time_s") is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(output: str = "runs/demo", *, quick: bool = False, pair: tuple[str, str] = DEMO_PAIR,
             data_dir: str | None = None, progress: bool = True, resume: bool = True, create_model=None,
             **overrides) -> dict[str, Any]:
    """Train ``pair`` (static, dynamic) with one recipe, print the side-by-side table and write the plots.

    Args:
        output: folder for the two runs, ``summary.md``, ``summary.json`` and ``plots/``.
        quick: the ~2-minute smoke recipe instead of the ~15-minute one.
        resume: continue (or reuse) runs already in ``output`` instead of refusing them.
        overrides: recipe fields to change (e.g. ``epochs=10``, ``train_subset=None``); applied to both models.

    Returns:
        ``{"recipe", "rows", "table", "plots"}``.
    """
    from .plot import plot_runs
    from .train import TrainConfig, fit

    recipe = dict(QUICK_RECIPE if quick else DEMO_RECIPE, **overrides)
    out = Path(output)
    results = {}
    for name in pair:
        config = TrainConfig(model=name, output=str(out / name), data_dir=data_dir, progress=progress,
                             resume=resume, **recipe)
        results[name] = fit(config, create_model=create_model)
    input_shape = (results[pair[0]]["model_kwargs"]["in_channels"], 28, 28)
    rows = compare(results, input_shape=input_shape, create_model=create_model)
    table = format_table(rows)
    budget = (f"{recipe['epochs']} epoch(s) on {results[pair[0]]['train_samples']} training images "
              f"(batch {recipe['batch_size']}, {recipe['optimizer']} lr {recipe['lr']}, seed {recipe['seed']}); "
              f"test set: 10 000 images. Latency: median eval forward on this machine (the models called in "
              f"turn, each after an untimed call of its own), ratio to {pair[0]}.")
    plots = plot_runs([out / name for name in pair], out / "plots")
    summary = {"recipe": recipe, "rows": rows, "table": table, "budget": budget, "plots": plots}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(table + "\n\n" + budget + "\n")
    print()
    print(table)
    print()
    print(budget)
    print("plots: " + ", ".join(plots))
    return summary
