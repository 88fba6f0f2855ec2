from __future__ import annotations

import argparse

HELP = "Evaluate a checkpoint (run folder, checkpoint folder or file): top-1 accuracy and loss."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dyconv.data import DATASETS

    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or a file in one")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data-dir")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--attention", choices=("dynamic", "uniform"), default="dynamic",
                        help="uniform: every attention replaced by 1/K (experts averaged)")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from dyconv.train import evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, args.dataset, data_dir=args.data_dir, split=args.split,
                            batch_size=args.batch_size, val_fraction=args.val_fraction, split_seed=args.split_seed,
                            image_size=args.image_size, attention=args.attention, device=args.device)
    print(f"{args.split} top-1 {100 * r['acc']:.2f}%  loss {r['loss']:.4f}  ({r['samples']} samples)")
    return 0
