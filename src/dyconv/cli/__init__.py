"""The ``dyconv`` command line: parses arguments, then calls the library. One module per command."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# Each name is a module ``dyconv.cli.<name>`` with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS = ("demo", "train", "eval", "plot", "models", "export", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dyconv", description="Dynamic convolution for PyTorch and Keras.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"dyconv.cli.{name.replace('-', '_')}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)
