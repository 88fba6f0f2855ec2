from __future__ import annotations

import argparse

HELP = ("Train the static twin and the DY model on Fashion-MNIST with the same recipe and seed, print the "
        "side-by-side table (test accuracy, params, MAdds, latency ratio) and write the plots (~15 min on 2 cores).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="~2-minute smoke version (1 epoch, 1000 training images)")
    parser.add_argument("--output", default="runs/demo", help="folder for both runs, summary and plots")
    parser.add_argument("--data-dir", default=None, help="where to look for Fashion-MNIST first")
    parser.add_argument("--models", nargs=2, metavar=("STATIC", "DYNAMIC"), default=None,
                        help="the pair to compare (default mobilenetv2_035 dy_mobilenetv2_035)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--train-subset", type=int, default=None, help="override the number of training images")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--fresh", action="store_true", help="refuse to reuse runs already in --output")


def run(args: argparse.Namespace) -> int:
    from dyconv.demo import DEMO_PAIR, run_demo

    overrides = {k: v for k, v in (("epochs", args.epochs), ("train_subset", args.train_subset),
                                   ("seed", args.seed)) if v is not None}
    run_demo(args.output, quick=args.quick, pair=tuple(args.models or DEMO_PAIR), data_dir=args.data_dir,
             progress=args.progress, resume=not args.fresh, **overrides)
    return 0
