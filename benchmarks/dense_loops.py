"""The dense kernel's two forward loops against static ``nn.Conv2d``: ``torch.ops.dyconv_cpu.dense_forward`` with
``loop="grid"`` (vectors of output positions on the zero-padded input's grid), ``loop="channels"`` (vectors of output
channels, no padded positions, the experts' rows packed for each block and step) and ``"auto"`` (the kernel's own
choice, ``channels_loop_pays`` in ``src/dyconv/csrc/cpu_kernel.cpp``).

    PYTHONPATH=src python benchmarks/dense_loops.py                          # the bench's 3x3 shapes, batches 1-32
    PYTHONPATH=src python benchmarks/dense_loops.py --layers 512 --sizes 4 7 --batch-sizes 8 32

For each ungrouped stride-1 3x3 layer shape of the bench matching ``--layers`` (``dyconv.benchmark.LAYER_SHAPES``; at
``--sizes`` instead of its own size where given), each batch size and both memory formats (input, experts and the
static convolution in the same format), K = 4 experts with a bias: the interleaved medians (each side called twice
untimed before each timed call at batch 1, ``interleaved_medians``' ``settle``) as ratios to static, and the largest
difference between the two loops' outputs relative to the largest output.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from dyconv.benchmark import FORMATS, LayerShape, dense_benchmark_shapes, interleaved_medians

LOOPS = ("grid", "channels", "auto")
EXPERTS = 4


def operands(shape: LayerShape, batch: int, memory_format: torch.memory_format) -> tuple[Tensor, ...]:
    """The input, the experts ``(K, C_out, C_in, k, k)``, an attention ``(B, K)`` and a bias ``(K, C_out)``, the
    input and experts in ``memory_format`` (the same ones on every call: a fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    k = shape.kernel_size
    x = torch.randn(batch, shape.in_channels, shape.size, shape.size, generator=generator)
    w = torch.randn(EXPERTS * shape.out_channels, shape.in_channels, k, k, generator=generator) * 0.05
    w = w.contiguous(memory_format=memory_format).view(EXPERTS, shape.out_channels, shape.in_channels, k, k)
    attention = torch.softmax(torch.randn(batch, EXPERTS, generator=generator), 1)
    bias = torch.randn(EXPERTS, shape.out_channels, generator=generator)
    return x.contiguous(memory_format=memory_format), w, attention, bias


def sides(shape: LayerShape, batch: int, memory_format: torch.memory_format) -> dict[str, Callable[[], Tensor]]:
    """The static convolution and ``dense_forward`` with each loop on :func:`operands`."""
    x, w, attention, bias = operands(shape, batch, memory_format)
    pad = shape.kernel_size // 2
    static = shape.conv().to(memory_format=memory_format).eval()
    fns: dict[str, Callable[[], Tensor]] = {"static": lambda: static(x)}
    for loop in LOOPS:
        fns[loop] = lambda loop=loop: torch.ops.dyconv_cpu.dense_forward(x, w, attention, bias, [pad, pad], [1, 1],
                                                                         loop)
    return fns


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", default=["3x3"], help="parts of the bench's layer shape names")
    parser.add_argument("--sizes", nargs="+", type=int, help="spatial sizes instead of each shape's own")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    shapes = dense_benchmark_shapes(parser, args.layers)
    if args.sizes:
        shapes = [dataclasses.replace(s, name=f"{s.name.split(' @')[0]} @{size}", size=size)
                  for s in shapes for size in args.sizes]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), K = {EXPERTS}; dense_forward's loops "
          "against static nn.Conv2d, ratios of interleaved medians (static in ms)")
    with torch.inference_mode():
        for shape in shapes:
            for format_name, memory_format in FORMATS.items():
                for batch in args.batch_sizes:
                    fns = sides(shape, batch, memory_format)
                    grid, channels = fns["grid"](), fns["channels"]()
                    difference = ((grid - channels).abs().max() / grid.abs().max()).item()
                    repeats, settle = (40, 2) if batch == 1 else (max(5, 64 // batch), 0)
                    med = interleaved_medians(fns, repeats, settle=settle)
                    ratios = ", ".join(f"{loop} {med[loop] / med['static']:.2f}x" for loop in LOOPS)
                    print(f"{shape.name}, {format_name}, b{batch}: static {med['static'] * 1e3:.2f} ms; {ratios}; "
                          f"loops differ {difference:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
