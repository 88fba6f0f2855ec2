from __future__ import annotations

import argparse

HELP = "Plot runs: training curves on one figure, attention entropy per layer and mean attention per class."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by dyconv train")
    parser.add_argument("--output", default=None, help="folder for the PNGs (default: the first run's plots/)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dyconv.plot import plot_runs

    for path in plot_runs(args.runs, args.output or Path(args.runs[0]) / "plots"):
        print(path)
    return 0
