"""Every strategy of ``dyconv.functional.dynamic_conv`` on the bench's layer shapes, on one device.

    PYTHONPATH=src python benchmarks/strategies.py --device cuda --train   # behind the GPU rules (README "On a GPU")
    PYTHONPATH=src python benchmarks/strategies.py --layers 512 --train
    PYTHONPATH=src python benchmarks/strategies.py --layers 256 512 --sizes 7 10 12 14 --strategies chunked dense_kernel
    PYTHONPATH=src python benchmarks/strategies.py --layers 1x1 --sizes 8 14 28 --train --format channels_last --settle 1

For each layer shape of ``dyconv.benchmark.LAYER_SHAPES`` at batch 32 (inference at the listed size; with
``--train`` also the training step, forward and backward, at half of it): the static ``nn.Conv2d`` and the layer
with each strategy forced (``"auto"`` is the layer's own choice), interleaved, medians in ms and as ratios to
static. Fresh layers (K = 4), in ``--format`` (input and weights; contiguous by default). ``--settle N``: N untimed
calls of each side just before each of its timed calls (``dyconv.benchmark.interleaved_medians``). ``--sizes`` runs
each chosen shape at these spatial sizes instead of its own (the rows named ``@size``).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from dyconv import DynamicConv2d, _cpu_kernel
from dyconv.benchmark import FORMATS, LAYER_SHAPES, interleaved_medians
from dyconv.functional import STRATEGIES, dynamic_conv


def strategy_forward(layer: DynamicConv2d, strategy: str):
    def forward(x):
        return dynamic_conv(x, layer.weight, layer.bias, layer.attention(x), layer.stride, layer._padding_pairs,
                            layer.dilation, layer.groups, layer.padding_mode, strategy)

    return forward


def applicable(strategy: str, shape, device: str) -> bool:
    if strategy == "depthwise_kernel":  # the compiled CPU kernel: depthwise layers only
        depthwise = shape.groups == shape.in_channels == shape.out_channels
        return depthwise and torch.device(device).type == "cpu" and _cpu_kernel.available()
    if strategy == "dense_kernel":  # the compiled CPU kernel: ungrouped stride-1 layers
        plain = shape.groups == 1 and shape.stride == 1
        return plain and torch.device(device).type == "cpu" and _cpu_kernel.available()
    return strategy != "matmul" or shape.kernel_size == 1


def measure(shape, batch: int, device: str, train: bool, repeats: int, strategies, memory_format=torch.contiguous_format,
            settle: int = 0) -> dict[str, float]:
    torch.manual_seed(0)
    static = shape.conv(device=device).to(memory_format=memory_format)
    layer = shape.conv(DynamicConv2d, num_experts=4, device=device).to(memory_format=memory_format)
    size = max(1, shape.size // 2) if train else shape.size
    x = torch.randn(batch, shape.in_channels, size, size, device=device).contiguous(memory_format=memory_format)
    x.requires_grad_(train)
    forwards = {"static": static, "auto": layer}
    forwards.update({s: strategy_forward(layer, s) for s in strategies if applicable(s, shape, device)})

    def call(forward):
        if train:
            return lambda: forward(x).square().mean().backward()

        def infer():
            with torch.no_grad():
                forward(x)

        return infer

    return interleaved_medians({name: call(f) for name, f in forwards.items()}, repeats, warmup=2, settle=settle)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--train", action="store_true", help="also the training step")
    parser.add_argument("--layers", nargs="*", default=None, metavar="SUBSTRING")
    parser.add_argument("--strategies", nargs="*", default=[s for s in STRATEGIES if s != "loop"],
                        choices=STRATEGIES)
    parser.add_argument("--sizes", nargs="*", type=int, default=None, metavar="N",
                        help="spatial sizes to run each chosen shape at instead of its own")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--format", default="contiguous", choices=list(FORMATS))
    parser.add_argument("--settle", type=int, default=0, metavar="N")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [s for s in LAYER_SHAPES if args.layers is None or any(p in s.name for p in args.layers)]
    if args.sizes:
        shapes = [dataclasses.replace(s, name=f"{s.name.rsplit('@', 1)[0]}@{n}", size=n)
                  for s in shapes for n in args.sizes]
    figures = ["inference"] + (["train"] if args.train else [])
    names = ["static", "auto"] + args.strategies
    print(f"device {args.device}, batch {args.batch}, {args.format}; ratio to static (static in ms)")
    print("| shape | figure | static ms | " + " | ".join(names[1:]) + " |")
    print("|---|---|---|" + "---|" * (len(names) - 1))
    for shape in shapes:
        for figure in figures:
            medians = measure(shape, args.batch, args.device, figure == "train", args.repeats, args.strategies,
                              FORMATS[args.format], args.settle)
            static = medians["static"]
            cells = [f"{medians[n] / static:.2f}×" if n in medians else "—" for n in names[1:]]
            print(f"| {shape.name} | {figure} | {static * 1e3:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
