from __future__ import annotations

import argparse

HELP = "Build a small dynamic network and run it on a batch (smoke demo)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from dyconv.demo import smoke_demo

    smoke_demo(batch_size=args.batch_size, seed=args.seed)
    return 0
