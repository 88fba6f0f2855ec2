"""Plots of training runs: curves of several runs on one figure, and the attention analysis of DY runs.

Reads the run folders that :func:`dyconv.train.fit` writes (``metrics.jsonl``, ``results.json``,
``attention.json``) and writes PNG files.

Example:
    >>> plot_runs(["runs/resnet10", "runs/dy_resnet10"], "runs/plots")
    ['runs/plots/curves.png', 'runs/plots/attention_entropy.png', 'runs/plots/attention_per_class.png']
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _read_run(run: Path) -> dict:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a run folder: it has no metrics.jsonl.")
    history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else {}
    attention = json.loads((run / "attention.json").read_text()) if (run / "attention.json").is_file() else None
    label = results.get("model") or run.name
    if "test_acc" in results:
        label += f" (test {100 * results['test_acc']:.2f}%)"
    return {"name": run.name, "label": label, "history": history, "attention": attention}


def _pick_layers(n: int, count: int) -> list[int]:
    if n <= count:
        return list(range(n))
    return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})


def plot_runs(runs: list[str | os.PathLike], output: str | os.PathLike, *, layers_per_class: int = 3) -> list[str]:
    """Write ``curves.png`` (loss and accuracy per epoch of every run, one figure) and, for runs with attention
    statistics, ``attention_entropy.png`` (normalised entropy per dynamic layer, 1 = uniform) and
    ``attention_per_class.png`` (mean attention per class, for ``layers_per_class`` layers spread over the
    depth). Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("plot_runs needs at least one run folder. Received: runs=[]")
    data = [_read_run(Path(r)) for r in runs]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in data:
        epochs = [h["epoch"] for h in run["history"]]
        line, = ax_loss.plot(epochs, [h["train_loss"] for h in run["history"]], "--", label=f"{run['label']} train")
        if all("val_loss" in h for h in run["history"]):
            ax_loss.plot(epochs, [h["val_loss"] for h in run["history"]], "-", color=line.get_color(),
                         label=f"{run['label']} val")
            ax_acc.plot(epochs, [100 * h["val_acc"] for h in run["history"]], "-", color=line.get_color(),
                        label=f"{run['label']} val")
        ax_acc.plot(epochs, [100 * h["train_acc"] for h in run["history"]], "--", color=line.get_color(),
                    label=f"{run['label']} train")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    written.append(str(out / "curves.png"))

    dynamic = [r for r in data if r["attention"] and r["attention"]["layers"]]
    if dynamic:
        fig, ax = plt.subplots(figsize=(max(6, 0.3 * max(len(r["attention"]["layers"]) for r in dynamic)), 4))
        for run in dynamic:
            ent = [layer["normalized_entropy"] for layer in run["attention"]["layers"]]
            ax.plot(range(1, len(ent) + 1), ent, "o-", label=run["label"])
        ax.set(xlabel="dynamic layer (input → output)", ylabel="mean attention entropy / log K",
               title="attention entropy over the test set (1 = uniform, 0 = one kernel)", ylim=(0, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "attention_entropy.png", dpi=120)
        plt.close(fig)
        written.append(str(out / "attention_entropy.png"))

        run = dynamic[-1]
        layers = run["attention"]["layers"]
        chosen = _pick_layers(len(layers), layers_per_class)
        classes = run["attention"].get("classes") or [str(i) for i in range(len(layers[0]["per_class"]))]
        fig, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen) + 1, 0.3 * len(classes) + 1.8),
                                 squeeze=False)
        for ax, index in zip(axes[0], chosen):
            layer = layers[index]
            image = ax.imshow(layer["per_class"], aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {index + 1}: {layer['name']}", fontsize=8)
            ax.set_xlabel("expert")
            ax.set_xticks(range(layer["num_experts"]))
            ax.set_yticks(range(len(classes)))
            ax.set_yticklabels(classes if index == chosen[0] else [], fontsize=7)
        fig.colorbar(image, ax=axes[0].tolist(), label="mean attention")
        fig.suptitle(f"mean attention per class — {run['label']}", fontsize=9)
        fig.savefig(out / "attention_per_class.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(str(out / "attention_per_class.png"))
    return written
