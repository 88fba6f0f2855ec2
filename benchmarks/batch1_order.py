"""Batch-1 inference of single 3x3 layers: dyconv vs the naive batch-as-groups code, in both call orders.

    PYTHONPATH=src python benchmarks/batch1_order.py

`dyconv bench` calls the sides in one fixed order (static, dyconv, naive) and the naive side shares the dyconv
layer's parameters, so the side that runs second may find the experts in cache. This prints the ratios to static
for both orders, and for a dyconv layer with its own parameters, as medians of 15 interleaved rounds (2 threads),
first as the sides run one after the other, then with two untimed calls of a side just before each of its
timed calls (what `dyconv bench` does for its batch-1 figures: ``interleaved_medians(..., settle=2)``).
"""

import torch

from dyconv import DynamicConv2d
from dyconv.benchmark import NaiveDynamicConv2d, interleaved_medians


def _inference(module, x):
    def run():
        with torch.inference_mode():
            module(x)

    return run


def main() -> None:
    torch.set_num_threads(2)
    for channels, size in ((64, 56), (256, 14), (512, 7)):
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
        dy = DynamicConv2d(channels, channels, 3, padding=1, bias=False).eval()
        own = DynamicConv2d(channels, channels, 3, padding=1, bias=False).eval()
        x = torch.randn(1, channels, size, size)
        fns = {"static": _inference(conv, x), "dyconv": _inference(dy, x),
               "naive": _inference(NaiveDynamicConv2d(dy).eval(), x), "dyconv, own parameters": _inference(own, x)}
        for settle, how in ((0, ""), (2, ", each side settled")):
            for order in (("static", "dyconv", "naive"), ("static", "naive", "dyconv"),
                          ("static", "dyconv, own parameters", "naive")):
                r = interleaved_medians({k: fns[k] for k in order}, 15, settle=settle)
                print(f"3x3 {channels}->{channels} @{size}{how}, order {' / '.join(order)}: "
                      + ", ".join(f"{k} {r[k] / r['static']:.2f}x" for k in order[1:]), flush=True)


if __name__ == "__main__":
    main()
