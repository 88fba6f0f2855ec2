from __future__ import annotations

import argparse

HELP = "Train a model (static or dynamic) on a dataset; resumable; runs distributed under torchrun."

S = argparse.SUPPRESS  # options not given stay absent, so a --config file can supply them


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dyconv.data import DATASETS

    p = parser.add_argument
    p("--config", default=S, help="YAML file of options (keys as below, '-' or '_'); explicit options win")
    p("--model", default=S, help="registry name, e.g. dy_resnet10 (see dyconv.list_models())")
    p("--dataset", choices=DATASETS, default=S, help="default fashion-mnist")
    p("--data-dir", default=S, help="where to look for the dataset first")
    p("--output", default=S, help="run folder (config, metrics.jsonl, checkpoint/, results.json)")
    p("--epochs", type=int, default=S, help="default 10")
    p("--batch-size", type=int, default=S, help="per process; default 128")
    p("--lr", type=float, default=S, help="peak learning rate; default 0.1")
    p("--optimizer", choices=("sgd", "adamw"), default=S, help="default sgd (Nesterov momentum 0.9)")
    p("--momentum", type=float, default=S)
    p("--weight-decay", type=float, default=S, help="default 5e-4, not on biases/norms")
    p("--warmup-epochs", type=float, default=S, help="linear warmup before the cosine decay; default 1")
    p("--min-lr", type=float, default=S, help="end of the cosine; default 0")
    p("--label-smoothing", type=float, default=S, help="default 0")
    p("--seed", type=int, default=S, help="weights, data order and augmentation; default 0")
    p("--temperature", default=S,
      help="START:END:EPOCHS (linear per step), START:END or a constant T; default 30:1 over 10 epochs "
           "(over half the run when it is shorter than 10 epochs)")
    p("--model-kwargs", nargs="*", default=S, metavar="KEY=VALUE", help="extra create_model arguments")
    p("--val-fraction", type=float, default=S, help="held out of the training set; default 0.1")
    p("--split-seed", type=int, default=S, help="seed of the validation split; default 0")
    p("--train-subset", type=int, default=S, help="train on this many samples only (fixed seed)")
    p("--image-size", type=int, default=S, help="ImageFolder images are resized to this; default 32")
    p("--limit-train-batches", type=int, default=S, help="at most this many batches per epoch")
    p("--stop-after", type=int, default=S, help="stop after this many epochs in this invocation (then --resume)")
    p("--resume", action="store_true", default=S, help="continue the run in --output from its checkpoint")
    p("--amp", action="store_true", default=S, help="mixed precision (bfloat16; float16 on CUDA with --amp-dtype)")
    p("--amp-dtype", choices=("bfloat16", "float16"), default=S)
    p("--device", default=S, help="auto (default), cpu, cuda, cuda:1, ...")
    p("--num-workers", type=int, default=S, help="data loader workers; default 0")
    p("--threads", type=int, default=S, help="torch intra-op threads; 1 is fastest on a CPU shared with other jobs")
    p("--sync-bn", action="store_true", default=S, help="synchronise BatchNorm statistics across processes")
    p("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")
    p("--no-test", dest="eval_test", action="store_false", default=S, help="skip the final test evaluation")
    p("--no-download", dest="download", action="store_false", default=S, help="never download data")


def config_from_args(args: argparse.Namespace):
    """TrainConfig from: its defaults, then the --config file, then the options given on the command line."""
    from dyconv.train import TrainConfig, load_config_file, parse_kwargs

    values = vars(args).copy()
    values.pop("command", None)
    values.pop("_run", None)
    merged = load_config_file(values.pop("config")) if "config" in values else {}
    if "model_kwargs" in values:
        merged["model_kwargs"] = {**merged.get("model_kwargs", {}), **parse_kwargs(values.pop("model_kwargs"))}
    merged.update(values)
    return TrainConfig.from_dict(merged)


def run(args: argparse.Namespace) -> int:
    from dyconv.train import fit

    import os

    results = fit(config_from_args(args))
    if "test_acc" in results and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports
        print(f"test top-1 {100 * results['test_acc']:.2f}%  loss {results['test_loss']:.4f}  -> {results['output']}")
    return 0
