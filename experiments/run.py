"""The README's results table: static vs DY pairs, 3 seeds, mean ± std, plus ablations. Resumable.

    python experiments/run.py                        # everything in experiments/table.yaml
    python experiments/run.py --only mnist1d --seeds 0   # a subset

Each run is an ordinary ``dyconv.train.fit`` run folder under ``--output`` (default ``results/``, git-ignored);
finished runs are reused, interrupted ones resumed. The summary (mean ± sample std over seeds) is written
to ``--summary`` (default ``experiments/results/``) as ``summary.json`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def plan(table: dict, seeds: list[int], only: list[str] | None) -> list[dict]:
    """Every run of the table: ``{"group", "label", "model", "recipe", "overrides", "seed", "name"}``."""
    runs = []
    # Seed-major order: after the first pass every row has one seed, so a table cut short is still complete.
    for seed in seeds:
        for group in table["groups"]:
            if only and group["name"] not in only:
                continue
            recipe = table["recipes"][group["recipe"]]
            for entry in group["runs"]:
                name = f"{group['name']}/{entry['label'].replace(' ', '_')}/seed{seed}"
                runs.append({"group": group["name"], "label": entry["label"], "model": entry["model"],
                             "recipe": recipe, "overrides": entry.get("overrides", {}), "seed": seed,
                             "uniform_eval": bool(entry.get("uniform_eval", False)), "name": name})
    return runs


def execute(run: dict, output: Path, data_dir: str | None) -> dict:
    from dyconv.train import TrainConfig, evaluate_checkpoint, fit

    folder = output / run["name"]
    results_file = folder / "results.json"
    if results_file.is_file():
        done = json.loads(results_file.read_text())
        if done.get("finished") and "test_acc" in done and (not run["uniform_eval"] or "test_acc_uniform" in done):
            return done
    overrides = dict(run["overrides"])
    model_kwargs = {**run["recipe"].get("model_kwargs", {}), **overrides.pop("model_kwargs", {})}
    config = TrainConfig.from_dict({**run["recipe"], **overrides, "model": run["model"], "seed": run["seed"],
                                    "output": str(folder), "data_dir": data_dir, "resume": True,
                                    "progress": False, "model_kwargs": model_kwargs})
    t0 = time.time()
    results = fit(config)
    results["wall_time_s"] = time.time() - t0
    if run["uniform_eval"]:
        # "Attention off": every attention replaced by 1/K, i.e. each layer uses the average of its K kernels.
        u = evaluate_checkpoint(folder, config.dataset, data_dir=data_dir, val_fraction=config.val_fraction,
                                split_seed=config.split_seed, attention="uniform")
        results["test_acc_uniform"] = u["acc"]
        results["test_loss_uniform"] = u["loss"]
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(table: dict, runs: list[dict], results: dict[str, dict]) -> dict:
    rows = []
    keyed: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        if run["name"] in results:
            keyed.setdefault((run["group"], run["label"]), []).append((run, results[run["name"]]))
    for (group, label), items in keyed.items():
        accs = [100 * r["test_acc"] for _, r in items]
        mean, std = _mean_std(accs)
        row = {"group": group, "label": label, "model": items[0][0]["model"], "seeds": [x["seed"] for x, _ in items],
               "test_acc": accs, "mean": mean, "std": std, "params": items[0][1]["params"],
               "train_time_s": statistics.mean(r["train_time_s"] for _, r in items),
               "val_acc": [100 * r["val_acc"] for _, r in items if r.get("val_acc") is not None]}
        if all("test_acc_uniform" in r for _, r in items):
            u = [100 * r["test_acc_uniform"] for _, r in items]
            row["uniform_acc"] = u
            row["uniform_mean"], row["uniform_std"] = _mean_std(u)
        rows.append(row)
    return {"recipes": table["recipes"], "rows": rows}


def to_markdown(summary: dict, table: dict) -> str:
    lines = ["| group | run | model | params | test top-1 (mean ± std) | seeds | per seed |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        per_seed = ", ".join(f"{a:.2f}" for a in r["test_acc"])
        lines.append(f"| {r['group']} | {r['label']} | `{r['model']}` | {r['params'] / 1e6:.3f}M | "
                     f"{r['mean']:.2f} ± {r['std']:.2f} | {len(r['seeds'])} | {per_seed} |")
        if "uniform_mean" in r:
            per = ", ".join(f"{a:.2f}" for a in r["uniform_acc"])
            lines.append(f"| {r['group']} | {r['label']}, attention off (experts averaged at test time) | "
                         f"`{r['model']}` | {r['params'] / 1e6:.3f}M | {r['uniform_mean']:.2f} ± "
                         f"{r['uniform_std']:.2f} | {len(r['seeds'])} | {per} |")
    lines.append("")
    for name, recipe in summary["recipes"].items():
        lines.append(f"- recipe `{name}`: " + ", ".join(f"{k}={v}" for k, v in recipe.items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default=str(HERE / "table.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the table's seeds")
    parser.add_argument("--only", nargs="+", default=None, help="group names to run")
    parser.add_argument("--output", default="results", help="run folders (git-ignored)")
    parser.add_argument("--summary", default=str(HERE / "results"), help="where summary.json/.md go")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: no spin-waiting when the CPU is shared); 0: PyTorch default")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)
    table = yaml.safe_load(Path(args.table).read_text())
    runs = plan(table, args.seeds or table.get("seeds", [0, 1, 2]), args.only)
    all_runs = plan(table, table.get("seeds", [0, 1, 2]), None)
    if args.dry_run:
        for r in runs:
            print(r["name"], r["model"], r["overrides"])
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results = {}
    summary_dir = Path(args.summary)
    summary_dir.mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run['name']} ({run['model']})", flush=True)
        results[run["name"]] = execute(run, Path(args.output), args.data_dir)
        r = results[run["name"]]
        print(f"    test top-1 {100 * r['test_acc']:.2f}%, train {r['train_time_s']:.0f}s"
              + (f", attention off {100 * r['test_acc_uniform']:.2f}%" if "test_acc_uniform" in r else ""),
              flush=True)
        # Rewritten after every run from every finished run on disk (other seeds may run in parallel
        # processes), so that a partial table is always usable.
        write_summary(table, all_runs, Path(args.output), summary_dir)
    print(write_summary(table, all_runs, Path(args.output), summary_dir))
    return 0


def finished_results(runs: list[dict], output: Path) -> dict[str, dict]:
    found = {}
    for run in runs:
        path = output / run["name"] / "results.json"
        if path.is_file():
            r = json.loads(path.read_text())
            if r.get("finished") and "test_acc" in r and (not run["uniform_eval"] or "test_acc_uniform" in r):
                found[run["name"]] = r
    return found


def write_summary(table: dict, runs: list[dict], output: Path, summary_dir: Path) -> str:
    summary = summarize(table, runs, finished_results(runs, output))
    text = to_markdown(summary, table)
    for name, content in (("summary.json", json.dumps(summary, indent=2) + "\n"), ("summary.md", text)):
        tmp = summary_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(content)
        os.replace(tmp, summary_dir / name)
    return text


if __name__ == "__main__":
    sys.exit(main())
