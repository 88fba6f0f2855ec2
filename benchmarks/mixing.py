"""The two measurements behind the eager strategy choices of ``dyconv.functional`` / ``dyconv._chunked``.

    PYTHONPATH=src python benchmarks/mixing.py              # 2 threads; --threads 1 for one
    PYTHONPATH=src python benchmarks/mixing.py --part tiny  # only the second table

1. *Kernel memory* (batch 1, inference): a 3×3 convolution whose kernel is freshly allocated memory (what
   ``torch.mm`` returns when the K experts are mixed) against the same convolution reading a kernel written into
   a reused buffer (``torch.mm(..., out=)``, what the ``"chunked"`` strategy does on the CPU), and the static
   convolution with a fixed kernel. Times include the mixing.
2. *Tiny outputs* (batch-128 training step: forward and backward): the strategies for deep layers on small
   images, where the output has a few positions per sample: ``"chunked"`` (writes per-sample kernels),
   ``"experts"`` (one convolution with all K kernels) and ``"unfold_experts"`` (the same as matrix products).

Sides are interleaved (one call of each per round) and the medians are printed, in ms and as ratios to static.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dyconv.functional import dynamic_conv

K = 4


def interleaved(fns: dict, rounds: int) -> dict:
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(ts) for name, ts in times.items()}


def kernel_memory(rounds: int) -> None:
    print("batch 1, inference, 3x3 conv: fresh kernel memory vs a reused buffer (ms, ratio to static)")
    for channels, size in ((64, 56), (256, 14), (512, 7)):
        w = torch.randn(K, channels, channels, 3, 3)
        flat = w.reshape(K, -1)
        x = torch.randn(1, channels, size, size)
        a = torch.softmax(torch.randn(1, K), 1)
        w0 = w[0].clone()
        buf = torch.empty(1, flat.shape[1])
        shape = (channels, channels, 3, 3)
        with torch.inference_mode():
            r = interleaved({
                "static": lambda: F.conv2d(x, w0, None, 1, 1),
                "mix, fresh memory": lambda: F.conv2d(x, torch.mm(a, flat).view(shape), None, 1, 1),
                "mix into reused buffer": lambda: F.conv2d(x, torch.mm(a, flat, out=buf).view(shape), None, 1, 1),
            }, rounds)
        print(f"  {channels}->{channels} @{size}: " + ", ".join(
            f"{k} {v:.2f} ({v / r['static']:.2f}x)" for k, v in r.items()))


def tiny_outputs(rounds: int) -> None:
    print("batch-128 training step (forward + backward), 3x3 conv, padding 1 (ms, ratio to static)")
    for batch, channels, size, stride in ((128, 512, 1, 1), (128, 256, 2, 1), (128, 256, 4, 2), (128, 128, 4, 1),
                                          (128, 64, 7, 1), (32, 512, 4, 1)):
        x = torch.randn(batch, channels, size, size, requires_grad=True)
        w = (torch.randn(K, channels, channels, 3, 3) * 0.05).requires_grad_()
        a = torch.softmax(torch.randn(batch, K), 1).requires_grad_()
        w0 = w[0].detach().clone().requires_grad_()

        def step(fn):
            def run():
                y = fn()
                y.backward(torch.ones_like(y))
            return run

        def dy(strategy):
            return step(lambda: dynamic_conv(x, w, None, a, [stride] * 2, [1] * 4, [1, 1], 1, strategy=strategy))

        r = interleaved({"static": step(lambda: F.conv2d(x, w0, None, stride, 1)), "chunked": dy("chunked"),
                         "experts": dy("experts"), "unfold_experts": dy("unfold_experts")}, rounds)
        out = (size + 2 - 3) // stride + 1
        print(f"  b{batch} {channels}ch {size}x{size} stride {stride} (output {out}x{out}): " + ", ".join(
            f"{k} {v:.1f}" + ("" if k == "static" else f" ({v / r['static']:.2f}x)") for k, v in r.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--part", choices=["all", "memory", "tiny"], default="all")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds, K = {K}")
    if args.part in ("all", "memory"):
        kernel_memory(args.rounds)
    if args.part in ("all", "tiny"):
        tiny_outputs(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
