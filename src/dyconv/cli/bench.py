from __future__ import annotations

import argparse

HELP = "Time dynamic against static convolution (layers, DY-ResNet-18, DY-MobileNetV2) and write CSV/JSON."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 5 (about half the time)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure and side (default 5)")
    parser.add_argument("--layers", nargs="*", default=None, metavar="SUBSTRING",
                        help="only layer shapes whose name contains one of these ('--layers' alone: none)")
    parser.add_argument("--networks", nargs="*", default=None, choices=["resnet18", "mobilenet_v2"],
                        help="networks to run (default both; '--networks' alone: none)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive batch-as-groups baseline")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224, help="network input size for inference")
    parser.add_argument("--train-image-size", type=int, default=112, help="network input size for training")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the run (default 2)")
    parser.add_argument("--device", default="cpu", help="device of the models and inputs (e.g. cuda; default cpu)")
    parser.add_argument("--launches", type=int, default=1,
                        help="runs of the whole benchmark, each in a fresh process, combined as medians (default 1)")
    parser.add_argument("--csv", default="dyconv-bench.csv", help="CSV output path ('' for none)")
    parser.add_argument("--json", default="dyconv-bench.json", help="JSON output path ('' for none)")


def run(args: argparse.Namespace) -> int:
    from dyconv.benchmark import LAYER_SHAPES, run_benchmark

    layers = LAYER_SHAPES
    if args.layers is not None:
        layers = [s for s in LAYER_SHAPES if any(part in s.name for part in args.layers)]
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    options = dict(layers=layers, networks=args.networks, batch_size=args.batch_size, image_size=args.image_size,
                   train_image_size=args.train_image_size, repeats=repeats, threads=args.threads,
                   naive=not args.no_naive, csv_path=args.csv or None, json_path=args.json or None,
                   device=args.device)
    if args.launches != 1:
        from dyconv.benchmark_launches import run_launches

        run_launches(args.launches, **options)
    else:
        run_benchmark(**options)
    return 0
