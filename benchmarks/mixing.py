"""The measurements behind the eager strategy choices of ``dyconv.functional`` / ``dyconv._chunked``.

    PYTHONPATH=src python benchmarks/mixing.py              # 2 threads; --threads 1 for one
    PYTHONPATH=src python benchmarks/mixing.py --part tiny  # only the second table (also: tiny1x1, per-sample,
                                                            # depthwise, depthwise-train, fold-chunks,
                                                            # chunk-mix)

1. *Kernel memory* (batch 1, inference): a 3×3 convolution whose kernel is freshly allocated memory (what
   ``torch.mm`` returns when the K experts are mixed) against the same convolution reading a kernel written into
   a reused buffer (``torch.mm(..., out=)``, what the ``"chunked"`` strategy does on the CPU), and the static
   convolution with a fixed kernel. Times include the mixing.
2. *Tiny outputs* (batch-128 training step: forward and backward): the strategies for deep layers on small
   images, where the output has a few positions per sample: ``"chunked"`` (writes per-sample kernels),
   ``"experts"`` (one convolution with all K kernels) and ``"unfold_experts"`` (the same as matrix products).
   The same for MobileNetV2's 1×1 layers at 4×4 (batch 32, both memory formats), the third table, with
   ``"scaled_inputs"`` (K scaled copies of the input, one product with the K kernels side by side).
3. *Per-sample convolutions* (batch 32, inference and training step, channels_last and contiguous): the
   ``"chunked"`` strategy with each chunk folded into the convolution's groups against one convolution per
   sample (``dyconv._chunked.PER_SAMPLE_MIN_POSITIONS``), for 3×3 and depthwise 3×3 layers at several sizes.
4. *Depthwise layers of MobileNetV2* (batch 32, inference; ``--part depthwise``): static in both memory formats,
   the chunked strategy folded and per sample in both, and the attention alone (its pooling pass reads the whole
   input, as the convolution does), each side a module of its own format. For channels_last input the folded
   convolution runs in channels_last (``dyconv._chunked._folded_channels_last``); "folded CL via C" is the plain
   fold instead (the chunk copied to the contiguous format, a contiguous output); "kernel CL" the compiled kernel
   (``"depthwise_kernel"``, what the layers take for such input since 2026-11-29; the other dynamic sides have it
   switched off, here and in parts 3, 5 and 6). Every call gets a fresh copy
   of the input (its cost is "input copy", included in every side's time), as inside a network, where a
   layer's input has just been written.
5. *The same layers in the training step* (``--part depthwise-train``, batch 32, forward and backward with a fixed
   output gradient, at the sizes of the bench's 112² training step): folded, per sample, and for channels_last
   input also "folded CL, backward via C" (the forward's channels_last fold with the plain fold's backward, which
   copies the chunk and its output gradient to the contiguous format and the input gradient back); "default" is
   what the layer picks (for channels_last input the compiled kernel).
6. *Folded pieces* (``--part fold-chunks``, batch 32, channels_last): the depthwise layers that the chunked
   strategy folds (under 512 output positions) at the bench's inference and training sizes, with the chunk
   convolved in pieces of at most ``dyconv._chunked.FOLD_CHUNK_ELEMENTS`` input + output elements (each piece
   copied into a reused workspace; one sample per piece is a view), from one sample per convolution to the whole
   chunk in one.
7. *Mixing a chunk's kernels* (``--part chunk-mix``): ``torch.mm``'s ``(n × K) @ (K × N)`` into a reused buffer
   against a scaled copy and K - 1 scaled adds per sample (``dyconv._chunked.scaled_adds``) and the compiled
   kernel's ``mix_rows`` (what ``"chunked"`` uses on the CPU since 2026-11-30 where the kernel is built), alone for
   MobileNetV2's 1×1 576→96 kernel (55296 elements, chunks of 32 samples) and kernel sizes N around the former
   thresholds ``SCALED_ADDS_MIN_ELEMENTS`` (one sample, 2^18) and ``SCALED_ADDS_CHUNK_MIN_ELEMENTS`` (several,
   2^19; both "never" since 2026-11-29, README "Mixing by scaled adds"), with as many samples as one chunk
   (``FORWARD_CHUNK_ELEMENTS``) holds, up to 32; then inside 3×3 layers at batch 32 (the chunk threshold patched for
   each side: 2^62 for torch.mm and mix_rows, 2^19 for scaled adds; mix_rows switched off for the other two), where
   the experts are read right after a convolution has used the caches.

Sides are interleaved (one call of each per round) and the medians are printed, in ms and as ratios to static.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dyconv import DynamicConv2d, _chunked, _cpu_kernel
from dyconv.functional import dynamic_conv

K = 4


def without_kernel(fn):
    """``fn`` run with the compiled depthwise kernel switched off (``"depthwise_kernel"`` not chosen), so that a
    side measures the chunked strategy it names even for channels_last depthwise layers."""
    def run():
        applies = _cpu_kernel.applies
        _cpu_kernel.applies = lambda *args: False
        try:
            return fn()
        finally:
            _cpu_kernel.applies = applies
    return run


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


def tiny_1x1(rounds: int) -> None:
    print("batch-32 training step (forward + backward with a fixed output gradient), MobileNetV2's 1x1 convs at 4x4 "
          "output (ms, ratio to static in the same format)")
    for cin, cout in ((160, 960), (320, 1280), (960, 160), (960, 320), (576, 160)):
        for fmt, memory_format in (("C", torch.contiguous_format), ("CL", torch.channels_last)):
            x = torch.randn(32, cin, 4, 4).contiguous(memory_format=memory_format).requires_grad_()
            grad = torch.randn(32, cout, 4, 4).contiguous(memory_format=memory_format)
            w = (torch.randn(K, cout, cin, 1, 1) * 0.05).requires_grad_()
            a = torch.softmax(torch.randn(32, K), 1).requires_grad_()
            w0 = w[0].detach().clone().contiguous(memory_format=memory_format).requires_grad_()

            def step(fn, grad=grad):
                return lambda: fn().backward(grad)

            def dy(strategy, x=x, w=w, a=a):
                return step(lambda: dynamic_conv(x, w, None, a, [1, 1], [0] * 4, [1, 1], 1, strategy=strategy))

            r = interleaved({"static": step(lambda x=x, w0=w0: F.conv2d(x, w0)), "chunked": dy("chunked"),
                             "experts": dy("experts"), "unfold_experts": dy("unfold_experts"),
                             "scaled_inputs": dy("scaled_inputs")}, rounds)
            print(f"  {cin}->{cout} {fmt}: " + ", ".join(
                f"{k} {v:.1f}" + ("" if k == "static" else f" ({v / r['static']:.2f}x)") for k, v in r.items()),
                flush=True)


def per_sample(rounds: int) -> None:
    print("batch 32, chunked strategy: chunks folded into groups vs one convolution per sample "
          "(ms, ratio to static in its faster format)")
    shapes = (("3x3 64", 64, 1, (56, 28)), ("3x3 128", 128, 1, (28, 14)), ("dw3x3 32", 32, 32, (112, 56)),
              ("dw3x3 144", 144, 144, (56, 28)), ("dw3x3 192", 192, 192, (28, 14)))
    for name, channels, groups, sizes in shapes:
        for size in sizes:
            for mode in ("inference", "training"):
                static = torch.nn.Conv2d(channels, channels, 3, 1, 1, groups=groups, bias=False)
                dy = DynamicConv2d(channels, channels, 3, 1, 1, groups=groups, bias=False, num_experts=K)
                fns = {}
                for fmt, memory_format in (("C", torch.contiguous_format), ("CL", torch.channels_last)):
                    x = torch.randn(32, channels, size, size).contiguous(memory_format=memory_format)
                    x.requires_grad_(mode == "training")
                    s, d = static.to(memory_format=memory_format), dy.to(memory_format=memory_format)

                    def call(layer, x=x, threshold=None, memory_format=memory_format):
                        def run():
                            layer.to(memory_format=memory_format)
                            if threshold is not None:
                                _chunked.PER_SAMPLE_MIN_POSITIONS = threshold
                                _chunked.PER_SAMPLE_GROUPED_MIN_ELEMENTS = 1
                            if mode == "training":
                                layer(x).sum().backward()
                            else:
                                with torch.no_grad():
                                    layer(x)
                        return run

                    fns[f"static {fmt}"] = call(s)
                    fns[f"groups {fmt}"] = without_kernel(call(d, threshold=10**9))
                    fns[f"per-sample {fmt}"] = without_kernel(call(d, threshold=1))
                defaults = _chunked.PER_SAMPLE_MIN_POSITIONS, _chunked.PER_SAMPLE_GROUPED_MIN_ELEMENTS
                try:
                    r = interleaved(fns, rounds)
                finally:
                    _chunked.PER_SAMPLE_MIN_POSITIONS, _chunked.PER_SAMPLE_GROUPED_MIN_ELEMENTS = defaults
                best = min(r["static C"], r["static CL"])
                print(f"  {name} @{size} {mode}: static {best:.1f}; " + ", ".join(
                    f"{k} {v / best:.2f}x" for k, v in r.items() if not k.startswith("static")))


def set_per_sample(per_sample, defaults) -> None:
    """Patch the chunked strategy's rule: every sample convolved on its own (True), every chunk folded into the
    groups (False), or the rule itself (None: ``defaults``, the thresholds' original values)."""
    if per_sample is None:
        _chunked.PER_SAMPLE_MIN_POSITIONS, _chunked.PER_SAMPLE_GROUPED_MIN_ELEMENTS = defaults
    else:
        _chunked.PER_SAMPLE_MIN_POSITIONS = 1 if per_sample else 10**9
        _chunked.PER_SAMPLE_GROUPED_MIN_ELEMENTS = 1


def depthwise(rounds: int) -> None:
    print("batch 32, inference, MobileNetV2's depthwise 3x3 layers: ratio to static in its faster format")
    shapes = ((32, 112, 1), (96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1), (192, 28, 2), (384, 14, 1),
              (576, 14, 1), (576, 14, 2), (960, 7, 1))
    defaults = _chunked.PER_SAMPLE_MIN_POSITIONS, _chunked.PER_SAMPLE_GROUPED_MIN_ELEMENTS

    folds_channels_last = _chunked._folds_channels_last

    def call(layer, x, per_sample=None, via_contiguous=False):
        def run():
            if per_sample is not None:
                set_per_sample(per_sample, defaults)
            _chunked._folds_channels_last = (lambda x, groups: False) if via_contiguous else folds_channels_last
            with torch.no_grad():
                layer(x.clone())
        return run

    for channels, size, stride in shapes:
        fns = {}
        for fmt, memory_format in (("C", torch.contiguous_format), ("CL", torch.channels_last)):
            x = torch.randn(32, channels, size, size).contiguous(memory_format=memory_format)
            static = torch.nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)
            dy = DynamicConv2d(channels, channels, 3, stride, 1, groups=channels, bias=False, num_experts=K)
            static, dy = static.to(memory_format=memory_format), dy.eval().to(memory_format=memory_format)
            fns[f"static {fmt}"] = call(static, x)
            fns[f"folded {fmt}"] = without_kernel(call(dy, x, per_sample=False))
            if fmt == "CL":
                fns["folded CL via C"] = without_kernel(call(dy, x, per_sample=False, via_contiguous=True))
            fns[f"per-sample {fmt}"] = without_kernel(call(dy, x, per_sample=True))
            if fmt == "CL":
                fns["kernel CL"] = call(dy, x)
            fns[f"attention {fmt}"] = call(dy.attention, x)
            fns[f"input copy {fmt}"] = lambda x=x: x.clone()
        try:
            r = interleaved(fns, rounds)
        finally:
            _chunked.PER_SAMPLE_MIN_POSITIONS, _chunked.PER_SAMPLE_GROUPED_MIN_ELEMENTS = defaults
            _chunked._folds_channels_last = folds_channels_last
        best = min(r["static C"], r["static CL"])
        print(f"  dw {channels} @{size} stride {stride}: static C {r['static C']:.1f} ms, CL {r['static CL']:.1f} ms; "
              + ", ".join(f"{k} {v / best:.2f}x" for k, v in r.items() if not k.startswith("static")))


def depthwise_train(rounds: int) -> None:
    print("batch-32 training step (forward + backward), MobileNetV2's depthwise 3x3 layers at the bench's 112² "
          "input: ratio to static in its faster format")
    shapes = ((32, 56, 1), (96, 56, 2), (144, 28, 1), (144, 28, 2), (192, 14, 1), (192, 14, 2), (384, 7, 1),
              (576, 7, 1), (576, 7, 2), (960, 4, 1))
    defaults = _chunked.PER_SAMPLE_MIN_POSITIONS, _chunked.PER_SAMPLE_GROUPED_MIN_ELEMENTS
    folds_channels_last = _chunked._folds_channels_last

    def call(layer, x, grad, per_sample=None, backward_via_contiguous=False):
        def run():
            set_per_sample(per_sample, defaults)
            y = layer(x.clone())
            if backward_via_contiguous:  # the forward's fold in channels_last, the backward's plain fold
                _chunked._folds_channels_last = lambda x, groups: False
            try:
                y.backward(grad)
            finally:
                _chunked._folds_channels_last = folds_channels_last
        return run

    for channels, size, stride in shapes:
        fns = {}
        out_size = (size - 1) // stride + 1
        for fmt, memory_format in (("C", torch.contiguous_format), ("CL", torch.channels_last)):
            x = torch.randn(32, channels, size, size).contiguous(memory_format=memory_format).requires_grad_()
            grad = torch.randn(32, channels, out_size, out_size).contiguous(memory_format=memory_format)
            static = torch.nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)
            dy = DynamicConv2d(channels, channels, 3, stride, 1, groups=channels, bias=False, num_experts=K)
            static, dy = static.to(memory_format=memory_format), dy.to(memory_format=memory_format)
            fns[f"static {fmt}"] = call(static, x, grad)
            fns[f"folded {fmt}"] = without_kernel(call(dy, x, grad, per_sample=False))
            if fmt == "CL":
                fns["folded CL, backward via C"] = without_kernel(
                    call(dy, x, grad, per_sample=False, backward_via_contiguous=True))
            fns[f"per-sample {fmt}"] = without_kernel(call(dy, x, grad, per_sample=True))
            fns[f"default {fmt}"] = call(dy, x, grad)  # for channels_last: the kernel
        try:
            r = interleaved(fns, rounds)
        finally:
            _chunked.PER_SAMPLE_MIN_POSITIONS, _chunked.PER_SAMPLE_GROUPED_MIN_ELEMENTS = defaults
        best = min(r["static C"], r["static CL"])
        print(f"  dw {channels} @{size} stride {stride}: static C {r['static C']:.1f} ms, CL {r['static CL']:.1f} ms; "
              + ", ".join(f"{k} {v / best:.2f}x" for k, v in r.items() if not k.startswith("static")), flush=True)


def fold_chunks(rounds: int) -> None:
    print("batch 32, channels_last, MobileNetV2's depthwise 3x3 layers that the chunked strategy folds (under 512 "
          "output positions) at the bench's sizes: ratio to static CL for budgets of FOLD_CHUNK_ELEMENTS "
          "(input + output elements of one folded convolution)")
    budgets = {"one sample": 1, "2^18": 1 << 18, "2^19": 1 << 19, "2^20": 1 << 20, "2^21": 1 << 21, "2^22": 1 << 22,
               "whole chunk": 1 << 40}
    default = _chunked.FOLD_CHUNK_ELEMENTS
    figures = (("inference @224", ((192, 28, 2), (384, 14, 1), (576, 14, 1), (576, 14, 2), (960, 7, 1))),
               ("training step @112", ((144, 28, 2), (192, 14, 1), (192, 14, 2), (384, 7, 1), (576, 7, 1),
                                       (576, 7, 2), (960, 4, 1))))

    def call(layer, x, grad, budget=None):
        def run():
            _chunked.FOLD_CHUNK_ELEMENTS = default if budget is None else budget
            if grad is None:
                with torch.no_grad():
                    layer(x.clone())
            else:
                layer(x.clone()).backward(grad)
        return run

    for figure, shapes in figures:
        print(f" {figure}" + (" (forward + backward)" if "training" in figure else ""))
        totals = dict.fromkeys(["static", *budgets], 0.0)
        for channels, size, stride in shapes:
            out_size = (size - 1) // stride + 1
            cl = torch.channels_last
            x = torch.randn(32, channels, size, size).contiguous(memory_format=cl)
            grad = None
            if "training" in figure:
                x.requires_grad_()
                grad = torch.randn(32, channels, out_size, out_size).contiguous(memory_format=cl)
            static = torch.nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False).to(memory_format=cl)
            dy = DynamicConv2d(channels, channels, 3, stride, 1, groups=channels, bias=False, num_experts=K)
            dy = dy.to(memory_format=cl).train(grad is not None)
            fns = {"static": call(static, x, grad)}
            fns.update({name: without_kernel(call(dy, x, grad, budget)) for name, budget in budgets.items()})
            try:
                r = interleaved(fns, rounds)
            finally:
                _chunked.FOLD_CHUNK_ELEMENTS = default
            per_sample = channels * size * size + channels * out_size * out_size
            print(f"  dw {channels} @{size} stride {stride} ({per_sample} elements per sample): static "
                  f"{r['static']:.2f} ms; " + ", ".join(f"{k} {r[k] / r['static']:.2f}x" for k in budgets), flush=True)
            for k in totals:
                totals[k] += r[k]
        print(f"  all rows: static {totals['static']:.1f} ms; "
              + ", ".join(f"{k} {totals[k]:.1f} ms" for k in budgets), flush=True)


def chunk_mix(rounds: int) -> None:
    compiled = _cpu_kernel.available()
    print("mixing a chunk's kernels, (n x K) @ (K x N) into a reused buffer, alone: torch.mm against scaled adds "
          "per sample" + (" and the compiled mix_rows" if compiled else "") + " (ms)")
    for numel in (55296, 1 << 18, 294912, 1 << 19, 589824, 1179648):
        experts = torch.randn(K, numel)
        rows = [experts[k] for k in range(K)]
        cells = []
        for n in sorted({1, 2, min(32, max(1, _chunked.FORWARD_CHUNK_ELEMENTS // numel))}):
            attention = torch.softmax(torch.randn(n, K), 1)
            out = torch.empty(n, numel)

            def adds(attention=attention, out=out, n=n):
                weights = attention.tolist()
                for i in range(n):
                    _chunked.scaled_adds(weights[i], rows, out[i])

            sides = {"mm": lambda attention=attention, out=out: torch.mm(attention, experts, out=out),
                     "scaled adds": adds}
            if compiled:
                sides["mix_rows"] = lambda attention=attention, out=out: torch.ops.dyconv_cpu.mix_rows(attention,
                                                                                                      experts, out)
            r = interleaved(sides, rounds)
            cells.append(f"n = {n}: " + ", ".join(f"{side} {r[side]:.3f}" for side in sides))
        print(f"  N = {numel}: " + "; ".join(cells))
    print("the same inside the layer, batch 32 (the chunked strategy, chunks mixed by torch.mm, by scaled adds"
          + (" or by mix_rows" if compiled else "") + "; ms, ratio to static)")
    default = _chunked.SCALED_ADDS_CHUNK_MIN_ELEMENTS
    for channels, size, train in ((256, 14, False), (256, 7, True), (512, 7, False), (128, 28, False)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            torch.manual_seed(0)
            static = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=fmt)
            layer = DynamicConv2d(channels, channels, 3, padding=1, bias=False, num_experts=K).to(memory_format=fmt)
            x = torch.randn(32, channels, size, size).contiguous(memory_format=fmt).requires_grad_(train)
            grad = torch.randn(32, channels, size, size).contiguous(memory_format=fmt)

            def call(module, threshold=None, kernel_mix=False):
                def run():
                    if threshold is not None:
                        _chunked.SCALED_ADDS_CHUNK_MIN_ELEMENTS = threshold
                    _chunked._compiled_mix = compiled_mix if kernel_mix else lambda *args: False
                    if train:
                        module(x).backward(grad)
                    else:
                        with torch.no_grad():
                            module(x)
                return run

            calls = []
            adds, compiled_mix = _chunked.scaled_adds, _chunked._compiled_mix
            _chunked.scaled_adds = lambda *args: calls.append(1) or adds(*args)
            sides = {"static": call(static), "mm": call(layer, 1 << 62), "scaled adds": call(layer, 1 << 19)}
            if compiled:
                sides["mix_rows"] = call(layer, 1 << 62, kernel_mix=True)
            try:
                r = interleaved(sides, rounds)
            finally:
                _chunked.SCALED_ADDS_CHUNK_MIN_ELEMENTS = default
                _chunked.scaled_adds, _chunked._compiled_mix = adds, compiled_mix
            name = "training step" if train else "inference"
            cl = "CL" if fmt == torch.channels_last else "C"
            # a layer whose chunks (or output-channel tiles) stay below the threshold mixes by torch.mm on the
            # "scaled adds" side too, and one that takes "dense_kernel" mixes inside that kernel on every side
            control = "" if calls else " (no scaled adds: that side ran torch.mm or the dense kernel)"
            ratios = ", ".join(f"{side} {r[side] / r['static']:.2f}x" for side in sides if side != "static")
            print(f"  3x3 {channels} @{size} {name} {cl}: static {r['static']:.1f}; {ratios}{control}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--part", choices=["all", "memory", "tiny", "tiny1x1", "per-sample", "depthwise",
                                           "depthwise-train", "fold-chunks", "chunk-mix"], default="all")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds, K = {K}")
    if args.part in ("all", "memory"):
        kernel_memory(args.rounds)
    if args.part in ("all", "tiny"):
        tiny_outputs(args.rounds)
    if args.part in ("all", "tiny1x1"):
        tiny_1x1(args.rounds)
    if args.part in ("all", "per-sample"):
        per_sample(args.rounds)
    if args.part in ("all", "depthwise"):
        depthwise(args.rounds)
    if args.part in ("all", "depthwise-train"):
        depthwise_train(args.rounds)
    if args.part in ("all", "fold-chunks"):
        fold_chunks(args.rounds)
    if args.part in ("all", "chunk-mix"):
        chunk_mix(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
