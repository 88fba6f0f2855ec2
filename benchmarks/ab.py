"""A/B of a DY network or layer between the working tree and a git revision, each side in its own process,
interleaved.

    PYTHONPATH=src python benchmarks/ab.py --against HEAD~1                 # DY-MobileNetV2, both figures
    PYTHONPATH=src python benchmarks/ab.py --against 1775bb1 --network resnet18 --figures train --rounds 15
    PYTHONPATH=src python benchmarks/ab.py --against HEAD~1 --layer "3x3 512" --figures batch --format contiguous

The revision's ``src`` is exported with ``git archive`` into a temporary directory. Three worker processes (the
static model, the DY model with the working tree's code, the DY model with the revision's) build the bench's models
(``dyconv.benchmark.build_network``, the same seed on every side) in ``--format``; the parent asks them for one
timed call at a time, in turn, so that only one of them runs at any moment (with ``--pause`` seconds between calls:
the OpenMP threads of the side that just ran spin for a while before they sleep). The figures are the bench's:
``batch`` is inference at ``--image-size`` (224), ``train`` a training step (forward, cross-entropy, backward, SGD
step) at ``--train-image-size`` (112), both at ``--batch-size`` (32). With ``--layer`` the sides are instead one of
the bench's layer shapes (``dyconv.benchmark.LAYER_SHAPES``, the one whose name contains the given text), built as
the bench builds them (``nn.Conv2d`` and ``DynamicConv2d`` with four experts, the same seed): ``batch`` runs it
without gradients at its listed size, ``train`` its forward and backward (loss: the output's mean square, no
optimizer) at half that size, with the input's gradient too. Each side's figure is the median over
``--rounds`` rounds, and the comparison is the paired difference (working tree minus revision, round by round: its
median, and in how many rounds the working tree was faster), which follows the machine's slow spells less than a
difference of medians does.

The workers are started afresh ``--launches`` times (3), each launch printed on its own: on this machine a launch
keeps its own bias for all its rounds (the paired difference of the same two revisions came out +69 ms in 3/15
rounds faster in one launch and -51 ms in 12/15 in the next), so only agreement across launches counts. Before
timing, the two DY sides' outputs for one input are compared (the working tree and the revision should compute the
same network; float32 rounding may differ where a change reordered the arithmetic). Revisions need
``dyconv.benchmark.build_network``, ``_infer`` and ``_train`` (2026-11-28 and later).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYER_PREFIX = "layer:"  # a worker's target that names a layer shape instead of a network


def worker(network: str, dynamic: bool, figure: str, memory_format: str, batch: int, size: int,
           threads: int) -> None:
    """Serve one side over stdin/stdout: ``check PATH`` saves its eval output for a fixed input, ``time`` runs one
    timed call and answers its seconds, ``quit`` ends."""
    import torch
    import torch.nn.functional as F

    from dyconv.benchmark import FORMATS, _infer, _train, build_network

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fmt = FORMATS[memory_format]
    generator = torch.Generator().manual_seed(1)
    if network.startswith(LAYER_PREFIX):
        from dyconv import DynamicConv2d
        from dyconv.benchmark import LAYER_SHAPES

        shape = next(s for s in LAYER_SHAPES if s.name == network[len(LAYER_PREFIX):])
        static, dy = shape.conv(), shape.conv(DynamicConv2d, num_experts=4)  # in the bench's order (the seed's draws)
        channels = shape.in_channels
    else:
        static, dy = build_network(network)
        channels = 3
    model = (dy if dynamic else static).to(memory_format=fmt)
    x = torch.randn(batch, channels, size, size, generator=generator).contiguous(memory_format=fmt)
    if figure == "train" and network.startswith(LAYER_PREFIX):
        x.requires_grad_()
        run = _train(model.train(), x, lambda y: y.square().mean(), None)
    elif figure == "train":
        labels = torch.randint(0, 1000, (batch,), generator=generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        run = _train(model.train(), x, lambda y: F.cross_entropy(y, labels), optimizer)
    else:
        run = _infer(model.eval(), x)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "check":
            with torch.no_grad():
                torch.save(model.eval()(x[:2]), argument)
            model.train(figure == "train")
            print("ok", flush=True)
        elif command == "time":
            start = time.perf_counter()
            run()
            print(time.perf_counter() - start, flush=True)
        elif command == "quit":
            return


class Side:
    def __init__(self, src: pathlib.Path, args: argparse.Namespace, figure: str, dynamic: bool):
        size = args.image_size if figure == "batch" else args.train_image_size
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", args.target,
                   "dy" if dynamic else "static", figure, args.format, str(args.batch_size), str(size),
                   str(args.threads)]
        env = {**os.environ, "PYTHONPATH": str(src)}
        if src != ROOT / "src":
            # the revision's compiled kernel in a build directory of its own: where its sources equal the working
            # tree's, the two would share one (named by the sources' digest), and each side's load, from its own
            # path, would rebuild it (about 40 s at every worker's start)
            env["TORCH_EXTENSIONS_DIR"] = str(src.parent / "torch_extensions")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, line: str) -> str:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"a worker ended without answering {line!r} (exit status {self.process.wait()})")
        return answer.strip()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        self.process.wait()


def export(revision: str, directory: pathlib.Path) -> pathlib.Path:
    """The revision's ``src`` under ``directory`` (raises with git's message if the revision is unknown)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "src"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {revision!r} failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory / "src"


def compare_outputs(tree: Side, rev: Side, directory: pathlib.Path) -> float:
    """Largest absolute difference between the two DY sides' outputs, relative to the largest output."""
    import torch

    paths = [directory / "tree.pt", directory / "rev.pt"]
    for side, path in zip((tree, rev), paths):
        side.ask(f"check {path}")
    a, b = (torch.load(p) for p in paths)
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        network, side, figure, memory_format, batch, size, threads = sys.argv[2:9]
        worker(network, side == "dy", figure, memory_format, int(batch), int(size), int(threads))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the git revision to compare the working tree with")
    parser.add_argument("--network", default="mobilenet_v2", choices=["mobilenet_v2", "resnet18"])
    parser.add_argument("--layer", help="time this layer shape of the bench (a part of its name) instead of a network")
    parser.add_argument("--figures", nargs="+", default=["batch", "train"], choices=["batch", "train"])
    parser.add_argument("--format", default="channels_last", choices=["contiguous", "channels_last"])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--train-image-size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between two timed calls")
    parser.add_argument("--launches", type=int, default=3, help="times the workers are started afresh")
    args = parser.parse_args(argv)
    for name in ("rounds", "launches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1. Received: {getattr(args, name)}")
    args.target, target_name = args.network, args.network
    if args.layer is not None:
        from dyconv.benchmark import LAYER_SHAPES

        matches = [s for s in LAYER_SHAPES if args.layer in s.name]
        if len(matches) != 1:
            parser.error(f"--layer must name one of the bench's layer shapes {[s.name for s in LAYER_SHAPES]}; "
                         f"{args.layer!r} matches {len(matches)}: {[s.name for s in matches]}")
        shape = matches[0]
        args.target, target_name = LAYER_PREFIX + shape.name, shape.name
        args.image_size, args.train_image_size = shape.size, max(1, shape.size // 2)  # what the workers run at
    print(f"working tree against {args.against}: {target_name}, {args.format}, {args.launches} launches of "
          f"{args.rounds} interleaved rounds, {args.threads} threads, batch {args.batch_size}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        rev_src = export(args.against, directory)
        for figure in args.figures:
            size = args.image_size if figure == "batch" else args.train_image_size
            all_paired = []
            for launch in range(args.launches):
                times = time_launch(args, figure, rev_src, directory, check=figure == args.figures[0] and launch == 0)
                med = {name: statistics.median(t) for name, t in times.items()}
                paired = [a - b for a, b in zip(times["tree"], times["rev"])]
                all_paired += paired
                print(f"{figure} @{size}, launch {launch + 1}: static {med['static'] * 1e3:.1f} ms; working tree "
                      f"{med['tree'] / med['static']:.3f}x ({med['tree'] * 1e3:.1f} ms), {args.against} "
                      f"{med['rev'] / med['static']:.3f}x ({med['rev'] * 1e3:.1f} ms); paired tree - {args.against}: "
                      f"median {statistics.median(paired) * 1e3:+.1f} ms, tree faster in "
                      f"{sum(d < 0 for d in paired)}/{len(paired)} rounds", flush=True)
            print(f"{figure} @{size}, all launches: paired tree - {args.against}: median "
                  f"{statistics.median(all_paired) * 1e3:+.1f} ms, tree faster in "
                  f"{sum(d < 0 for d in all_paired)}/{len(all_paired)} rounds", flush=True)
    return 0


def time_launch(args: argparse.Namespace, figure: str, rev_src: pathlib.Path, directory: pathlib.Path,
                check: bool) -> dict[str, list[float]]:
    """One launch of the three workers: seconds per round for each side (and the output comparison if ``check``)."""
    sides = {"static": Side(ROOT / "src", args, figure, False), "tree": Side(ROOT / "src", args, figure, True),
             "rev": Side(rev_src, args, figure, True)}
    try:
        if check:
            print(f"outputs (2 samples, eval): largest |tree - {args.against}| relative to the largest output "
                  f"{compare_outputs(sides['tree'], sides['rev'], directory):.2e}", flush=True)
        for side in sides.values():  # warm-up
            side.ask("time")
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, side in sides.items():
                time.sleep(args.pause)
                times[name].append(float(side.ask("time")))
        return times
    finally:
        for side in sides.values():
            side.close()


if __name__ == "__main__":
    raise SystemExit(main())
