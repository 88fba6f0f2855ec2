"""Repeated training-memory readings of DY-ResNet-18 and static ResNet-18, in both memory formats, at any revision.

    PYTHONPATH=src python benchmarks/memory_readings.py                     # the working tree
    PYTHONPATH=src python benchmarks/memory_readings.py --revisions 5afca1a 4b44929 HEAD

For each revision (its ``src`` exported with ``git archive``, as ``benchmarks/ab.py`` does; none given: the working
tree's), a fresh process builds the bench's models (``dyconv.benchmark.build_network``, seed 0) and reads
``dyconv.benchmark.training_memory_with_workspaces`` of the bench's training step (batch 32 at 112², SGD) ``--readings``
times per model and memory format, in MB: the figure of the bench's memory column. Readings of identical steps should
agree; before 4b44929 they did not (README, "The memory reading").
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

from ab import export

_CHILD = """
import sys, torch, torch.nn.functional as F
from dyconv.benchmark import build_network, _train, training_memory_with_workspaces
readings = int(sys.argv[1])
torch.manual_seed(0)
static, dynamic = build_network("resnet18")
labels = torch.randint(0, 1000, (32,))
for name, model in (("static", static), ("dyconv", dynamic)):
    for fmt, memory_format in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        model = model.to(memory_format=memory_format).train()
        x = torch.randn(32, 3, 112, 112).contiguous(memory_format=memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        step = _train(model, x, lambda y: F.cross_entropy(y, labels), optimizer)
        values = [training_memory_with_workspaces(step) / 2**20 for _ in range(readings)]
        print(f"  {name} {fmt}: " + ", ".join(f"{v:.1f}" for v in values) + " MB", flush=True)
"""


def read(src: pathlib.Path, readings: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(src))
    subprocess.run([sys.executable, "-c", _CHILD, str(readings)], env=env, check=True, stderr=subprocess.DEVNULL)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revisions", nargs="*", default=[], help="git revisions (default: the working tree)")
    parser.add_argument("--readings", type=int, default=4)
    args = parser.parse_args(argv)
    if not args.revisions:
        print("working tree")
        read(pathlib.Path(__file__).resolve().parents[1] / "src", args.readings)
    for revision in args.revisions:
        with tempfile.TemporaryDirectory() as tmp:
            print(revision)
            read(export(revision, pathlib.Path(tmp)), args.readings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
