"""What batch-1 inference costs, part by part: the measurements behind the README's "What bounds the rest".

    PYTHONPATH=src python benchmarks/batch1_parts.py

1. Mixing one sample's kernel, (1 x K) @ (K x N), K = 4: ``torch.mm`` against a scaled copy and K - 1 scaled
   in-place adds (what ``dyconv._chunked.mix`` does on the CPU from ``SCALED_ADDS_MIN_ELEMENTS``), medians of 300
   calls (warm caches).
2. The attention's linear layers for one sample: a one-row ``addmm`` against ``addmv`` (what
   ``ExpertAttention`` does at batch 1), and the whole attention of a layer.
3. DY-ResNet-18 / DY-MobileNetV2 against torchvision at batch 1, 224², channels_last: ``torch.profiler`` self CPU
   time per image of the convolutions and of the mixing ops (``mm``, ``mul``, ``add_``), 10 images, the two sides
   profiled twice in turn.
"""

from __future__ import annotations

import statistics
import time

import torch

from dyconv import DynamicConv2d
from dyconv.benchmark import build_network

K = 4


def median_us(fn, calls: int = 300) -> float:
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def mixing() -> None:
    print("mixing one kernel, (1 x 4) @ (4 x N): torch.mm against scaled adds (us, warm)")
    for n in (1296, 13824, 147456, 409600, 2359296):
        flat, a, out = torch.randn(K, n), torch.softmax(torch.randn(1, K), 1), torch.empty(1, n)

        def adds():
            w = a[0].tolist()
            row = torch.mul(flat[0], w[0], out=out[0])
            for k in range(1, K):
                row.add_(flat[k], alpha=w[k])

        print(f"  N = {n}: mm {median_us(lambda: torch.mm(a, flat, out=out)):.1f}, scaled adds {median_us(adds):.1f}")


def attention() -> None:
    print("attention of one sample, 576 channels at 14x14 (hidden 144): us")
    layer = DynamicConv2d(576, 576, 3, padding=1, groups=576, bias=False).eval()
    x = torch.randn(1, 576, 14, 14)
    fc1, fc2 = layer.router.fc1, layer.router.fc2
    with torch.inference_mode():
        s = x.sum([2, 3])
        h = torch.relu(fc1(s))
        parts = {
            "fc1 as addmm": lambda: torch.addmm(fc1.bias, s, fc1.weight.t()),
            "fc1 as addmv": lambda: torch.addmv(fc1.bias, fc1.weight, s[0]),
            "fc2 as addmm": lambda: torch.addmm(fc2.bias, h, fc2.weight.t()),
            "fc2 as addmv": lambda: torch.addmv(fc2.bias, fc2.weight, h[0]),
            "pooling (sum)": lambda: x.sum([2, 3]),
            "whole attention": lambda: layer.attention(x),
        }
        print("  " + ", ".join(f"{k} {median_us(f):.1f}" for k, f in parts.items()))


def networks() -> None:
    print("batch 1, 224x224, channels_last: torch.profiler self CPU ms per image")
    from torch.profiler import profile

    x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    for name in ("resnet18", "mobilenet_v2"):
        static, dynamic = build_network(name)
        for _ in range(2):
            for side, model in (("static", static), ("dyconv", dynamic)):
                model.to(memory_format=torch.channels_last).eval()
                with torch.inference_mode():
                    model(x)
                    with profile() as prof:
                        for _ in range(10):
                            model(x)
                per = {e.key: e.self_cpu_time_total / 10e3 for e in prof.key_averages()}
                convs = sum(v for k, v in per.items() if "convolution" in k or "conv2d_forward" in k)
                mixes = sum(per.get(k, 0.0) for k in ("aten::mm", "aten::mul", "aten::add_"))
                print(f"  {name} {side}: all ops {sum(per.values()):.1f}, convolutions {convs:.1f}, "
                      f"mm/mul/add_ {mixes:.1f}")


def main() -> None:
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, 2 threads")
    mixing()
    attention()
    networks()


if __name__ == "__main__":
    main()
