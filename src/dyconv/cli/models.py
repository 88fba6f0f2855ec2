from __future__ import annotations

import argparse

HELP = ("Print every registered model's parameters and MAdds (batch 1, eval; 3x224x224, or 1x40 for the 1-D pair) "
        "beside the paper's figures, as a Markdown table.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", default="*", help="shell-style pattern of model names (default: all)")


def run(args: argparse.Namespace) -> int:
    from dyconv.models import format_table, model_table

    print(format_table(model_table(args.pattern)))
    return 0
