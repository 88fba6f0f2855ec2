"""Lower bounds for an exact dynamic convolution built from PyTorch operators, on the bench's layer shapes.

    PYTHONPATH=src python benchmarks/floors.py                      # every layer shape, batch 32, both figures
    PYTHONPATH=src python benchmarks/floors.py --layers 512 256 --figures train

Every exact way we know of computing a dynamic convolution with PyTorch's operators falls in one of two families:

* per-sample kernels: mix each sample's kernel, convolve each sample with its own kernel; training also needs the
  gradient of every sample's kernel (the experts' and the attention's gradients are reductions of it);
* K kernels: convolve every sample with all K experts (K × C_out output channels), then mix the K outputs per
  sample; training takes the gradients of that K-fold convolution.

A family's convolution part alone, with everything else left out (no attention, no mixing of kernels or outputs,
no reductions; the per-sample kernels given, already in memory), bounds that family's time from below, and the
smaller of the two bounds bounds the layer's. Each family's convolution is timed in every form we know, in both
memory formats, and its fastest counts: per-sample kernels with 1, 4, 8 or 32 samples folded into the groups of one
convolution (1: a dense convolution per sample) and, for 1×1 kernels, one batched matrix product; K kernels as one
convolution and, for ungrouped layers, as one matrix product on the patches (``F.unfold``). For each layer shape of
``dyconv.benchmark.LAYER_SHAPES`` at batch 32 (inference at the listed size, the training step's forward and
backward at half of it, as ``dyconv bench`` times the layers) this prints, as ratios to static ``nn.Conv2d`` in
its faster format: each family's bound with its fastest form, the smaller one ("floor"), and the layer itself
(``DynamicConv2d``, its own strategy, faster format). All sides run in the same interleaved rounds; medians.
Backward is driven by a fixed gradient of each side's output (the K-fold convolution's is K times larger: that is
part of its cost). A form nobody has found yet could go below these bounds; a fused kernel that mixes inside the
convolution's tiles would.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dyconv import DynamicConv2d
from dyconv.benchmark import FORMATS, LAYER_SHAPES, LayerShape, interleaved_medians

FIGURES = ("inference", "train")
CHUNKS = (1, 4, 8, 32)  # samples per folded convolution (1: a dense convolution per sample)


def _per_sample(shape: LayerShape, chunk: int, kernels: list[Tensor]) -> Callable[[Tensor], Tensor]:
    """Every sample convolved with its own given kernel, ``chunk`` samples folded into the groups per call
    (``kernels``: one leaf tensor ``(chunk * C_out, C_in / g, k, k)`` per chunk, so that backward writes each
    chunk's kernel gradients once)."""
    pad, stride, out_channels = shape.kernel_size // 2, shape.stride, shape.out_channels

    def forward(x: Tensor) -> Tensor:
        outs = []
        for i, start in enumerate(range(0, x.shape[0], chunk)):
            x_c = x[start : start + chunk]
            n = x_c.shape[0]
            out = F.conv2d(x_c.reshape(1, -1, *x.shape[2:]), kernels[i], None, stride, pad, 1, n * shape.groups)
            outs.append(out.reshape(n, out_channels, *out.shape[2:]))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    return forward


def _bmm(shape: LayerShape, kernels: Tensor) -> Callable[[Tensor], Tensor]:
    """1×1 kernels: one batched matrix product (``kernels``: ``(B, C_out, C_in)``)."""

    def forward(x: Tensor) -> Tensor:
        batch, size = x.shape[0], x.shape[2:]
        cols = x.reshape(batch, x.shape[1], -1)
        if x.is_contiguous():
            return torch.bmm(kernels, cols).reshape(batch, shape.out_channels, *size)
        # channels_last: (L, C_in) @ (C_in, C_out) per sample writes a channels_last output
        out = torch.bmm(cols.transpose(1, 2), kernels.transpose(1, 2))
        return out.reshape(batch, *size, shape.out_channels).permute(0, 3, 1, 2)

    return forward


def _k_kernels_gemm(shape: LayerShape, experts: Tensor) -> Callable[[Tensor], Tensor]:
    """Ungrouped layers: all K kernels as one matrix product on the patches (``F.unfold``; none for 1×1)."""

    def forward(x: Tensor) -> Tensor:
        batch = x.shape[0]
        if shape.kernel_size == 1 and shape.stride == 1:
            cols = x.reshape(batch, x.shape[1], -1).transpose(1, 2)  # a view for channels_last input
        else:
            cols = F.unfold(x, shape.kernel_size, 1, shape.kernel_size // 2, shape.stride).transpose(1, 2)
        return F.linear(cols.reshape(-1, cols.shape[2]), experts.reshape(experts.shape[0], -1))

    return forward


def forms(shape: LayerShape, batch: int, train: bool) -> dict[str, Callable[[Tensor], Tensor]]:
    """``name -> forward`` for static, each form of each family, and the layer itself."""
    torch.manual_seed(0)
    k, per_group = shape.kernel_size, shape.in_channels // shape.groups
    kernel = (shape.out_channels, per_group, k, k)
    experts = torch.randn(4 * shape.out_channels, per_group, k, k, requires_grad=train)
    out: dict[str, Callable[[Tensor], Tensor]] = {
        "static": shape.conv(),
        "dyconv": shape.conv(DynamicConv2d, num_experts=4),
        "K kernels, convolution": lambda x: F.conv2d(x, experts, None, shape.stride, k // 2, 1, shape.groups),
    }
    if shape.groups == 1:
        out["K kernels, matrix product"] = _k_kernels_gemm(shape, experts)
    for chunk in CHUNKS:
        kernels = [torch.randn(min(chunk, batch - s) * kernel[0], *kernel[1:], requires_grad=train)
                   for s in range(0, batch, chunk)]
        name = "per-sample kernels, " + ("one per sample" if chunk == 1 else f"folded by {chunk}")
        out[name] = _per_sample(shape, chunk, kernels)
    if k == 1 and shape.stride == 1 and shape.groups == 1:
        kernels = torch.randn(batch, shape.out_channels, per_group, requires_grad=train)
        out["per-sample kernels, bmm"] = _bmm(shape, kernels)
    return out


def sides(shape: LayerShape, batch: int, train: bool) -> dict[tuple[str, str], Callable[[], object]]:
    """Every form in every memory format: ``(form, format) -> one timed call`` (inference without autograd; the
    training step's forward and backward, backward driven by a fixed gradient of the form's output)."""
    size = max(1, shape.size // 2) if train else shape.size
    calls: dict[tuple[str, str], Callable[[], object]] = {}
    for fmt, memory_format in FORMATS.items():
        x = torch.randn(batch, shape.in_channels, size, size).contiguous(memory_format=memory_format)
        x.requires_grad_(train)
        for name, forward in forms(shape, batch, train).items():
            if isinstance(forward, torch.nn.Module):
                forward = forward.to(memory_format=memory_format)
            if train:
                with torch.no_grad():
                    grad = torch.randn_like(forward(x))  # the output's shape and format

                def call(forward=forward, x=x, grad=grad):
                    forward(x).backward(grad)
            else:

                def call(forward=forward, x=x):
                    with torch.inference_mode():
                        forward(x)

            calls[(name, fmt)] = call
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--figures", nargs="*", default=list(FIGURES), choices=FIGURES)
    parser.add_argument("--layers", nargs="*", default=None, metavar="SUBSTRING")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [s for s in LAYER_SHAPES if args.layers is None or any(p in s.name for p in args.layers)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, K = 4, "
          f"{args.repeats} interleaved rounds; ratios to static in its faster format (static ms)")
    print("| shape | figure | static ms | per-sample kernels, convolution only | K kernels, convolution only "
          "| floor | dyconv |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        for figure in args.figures:
            medians = interleaved_medians(sides(shape, args.batch, figure == "train"), args.repeats, warmup=2)
            best: dict[str, tuple[float, str]] = {}
            for (name, fmt), t in medians.items():
                if name not in best or t < best[name][0]:
                    best[name] = (t, "C" if fmt == "contiguous" else "CL")
            static = best.pop("static")[0]

            def family(prefix: str) -> tuple[float, str]:
                t, label = min((v[0], f"{k.removeprefix(prefix)} {v[1]}") for k, v in best.items() if k.startswith(prefix))
                return t, label

            per_sample, kernels = family("per-sample kernels, "), family("K kernels, ")
            floor = min(per_sample[0], kernels[0])
            print(f"| {shape.name} | {figure} | {static * 1e3:.2f} | {per_sample[0] / static:.2f}× ({per_sample[1]}) | "
                  f"{kernels[0] / static:.2f}× ({kernels[1]}) | {floor / static:.2f}× | "
                  f"{best['dyconv'][0] / static:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
