"""DY-ResNet-18 and DY-MobileNetV2 against torchvision's static twins on a CUDA device, eager and replayed from a
CUDA graph (one launch for the whole forward), inference at batch 1 and batch 32.

    PYTHONPATH=src python benchmarks/cuda_graphs.py            # needs a CUDA device

At these sizes a GPU spends most of an eager forward launching kernels and running Python: a dynamic layer adds
about ten small operations to its convolution. A CUDA graph replays the recorded kernels without either, so its
ratio shows what the dynamic layers cost on the GPU itself. Sides interleaved, medians of ``--repeats`` timed calls
(each synchronised), channels_last, fp32 (PyTorch's default TF32 settings).
"""

from __future__ import annotations

import argparse

import torch

from dyconv.benchmark import build_network, cuda_graph, interleaved_medians


def graphed(model: torch.nn.Module, x: torch.Tensor):
    """A function that replays ``model(x)`` from a CUDA graph, checked against the eager numbers first."""
    replay, out = cuda_graph(model, x)
    replay()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-3, atol=1e-3)
    return replay


def eager(model: torch.nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            model(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ratio to static (static in ms)")
    print("| network | batch | eager | CUDA graph |")
    print("|---|---|---|---|")
    for name in ("resnet18", "mobilenet_v2"):
        torch.manual_seed(0)
        static, dynamic = (m.cuda().eval().to(memory_format=torch.channels_last) for m in build_network(name))
        for batch in (1, 32):
            x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
            fns = {"static eager": eager(static, x), "dy eager": eager(dynamic, x),
                   "static graph": graphed(static, x), "dy graph": graphed(dynamic, x)}
            med = interleaved_medians(fns, args.repeats, warmup=2)
            cells = [f"{med['dy ' + kind] / med['static ' + kind]:.2f}× ({med['static ' + kind] * 1e3:.2f} ms)"
                     for kind in ("eager", "graph")]
            print(f"| {name} | {batch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
