"""What the experts' streaming costs the dense kernel: ``torch.ops.dyconv_cpu.dense_forward`` (README, the
``"dense_kernel"`` item) with 1, 2 and 4 experts against static ``nn.Conv2d`` of the same shape.

    PYTHONPATH=src python benchmarks/dense_experts.py                       # 3x3 512->512 @7, batches 1 and 32
    PYTHONPATH=src python benchmarks/dense_experts.py --layers 256 512 --batch-sizes 1 --rounds 5

With one expert the kernel does everything it does with four (the padded copy, the convolution over the padded
grid, one mixing pass per sample and step) except read the other experts, so the step from one expert to four is
what streaming three more copies of the kernel costs (9.4 MB each for 3x3 512->512). For each of the bench's layer
shapes matching ``--layers`` (``dyconv.benchmark.LAYER_SHAPES``), each batch size and both memory formats (input,
experts and the static convolution in the same format), this prints the interleaved medians (each side called twice
untimed before each timed call at batch 1, ``interleaved_medians``' ``settle``) as ratios to static, ``--rounds``
times.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import Tensor

from dyconv.benchmark import FORMATS, LayerShape, dense_benchmark_shapes, interleaved_medians

EXPERTS = (1, 2, 4)


def operands(shape: LayerShape, batch: int, memory_format: torch.memory_format) -> tuple[Tensor, dict]:
    """The input and, for each expert count, the experts ``(K, C_out, C_in, k, k)`` and an attention ``(B, K)``, in
    ``memory_format`` (the same ones on every call: a fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    k = shape.kernel_size
    x = torch.randn(batch, shape.in_channels, shape.size, shape.size, generator=generator)
    experts = {}
    for count in EXPERTS:
        w = torch.randn(count * shape.out_channels, shape.in_channels, k, k, generator=generator) * 0.05
        w = w.contiguous(memory_format=memory_format).view(count, shape.out_channels, shape.in_channels, k, k)
        experts[count] = (w, torch.softmax(torch.randn(batch, count, generator=generator), 1))
    return x.contiguous(memory_format=memory_format), experts


def sides(shape: LayerShape, batch: int, memory_format: torch.memory_format) -> dict[str, Callable[[], object]]:
    """The static convolution and the dense kernel with 1, 2 and 4 experts (no bias) on :func:`operands`."""
    x, experts = operands(shape, batch, memory_format)
    pad = shape.kernel_size // 2
    static = shape.conv().to(memory_format=memory_format).eval()
    fns: dict[str, Callable[[], object]] = {"static": lambda: static(x)}
    for count, (w, a) in experts.items():
        fns[f"{count} expert{'s' if count > 1 else ''}"] = (
            lambda w=w, a=a: torch.ops.dyconv_cpu.dense_forward(x, w, a, None, [pad, pad], [1, 1]))
    return fns


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", default=["3x3 512"], help="parts of the bench's layer shape names")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    shapes = dense_benchmark_shapes(parser, args.layers)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); dense_forward against static nn.Conv2d, "
          "ratios of interleaved medians (static in ms)")
    with torch.inference_mode():
        for shape in shapes:
            for batch in args.batch_sizes:
                for format_name, memory_format in FORMATS.items():
                    fns = sides(shape, batch, memory_format)
                    for _ in range(args.rounds):
                        repeats, settle = (40, 2) if batch == 1 else (7, 0)
                        med = interleaved_medians(fns, repeats, settle=settle)
                        ratios = ", ".join(f"{name} {med[name] / med['static']:.2f}x" for name in fns
                                           if name != "static")
                        print(f"{shape.name}, batch {batch}, {format_name}: static {med['static'] * 1e3:.2f} ms; "
                              f"{ratios}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
