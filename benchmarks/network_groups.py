"""Where a DY network's extra time sits: the network with one group of its dynamic layers made static at a time.

    PYTHONPATH=src python benchmarks/network_groups.py                       # DY-MobileNetV2, both figures
    PYTHONPATH=src python benchmarks/network_groups.py --network resnet18 --figures train

For the bench's DY network (``dyconv.benchmark.build_network``) the figures of ``dyconv bench`` (batch-32
inference at 224², the batch-32 training step at 112² with SGD), timed for: the static twin, the DY network, and
the DY network with the dynamic layers of one group replaced by static convolutions of the same shape (the
groups: depthwise layers, 1×1 layers whose input is at least 28² at 112² input, 1×1 layers on smaller inputs,
other dense layers). What a group's replacement saves is that group's share of the DY network's extra time, in
the network, with everything around it as it is. Each model in its own memory format (``--format``: the
static side channels_last and the dynamic ones contiguous by default, the formats the bench mostly picks);
interleaved, medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

from dyconv import DynamicConv2d
from dyconv.benchmark import FORMATS, _infer, _train, build_network, interleaved_medians

GROUPS = ("depthwise", "1x1 @>=28", "1x1 @<28", "dense kxk")


def group_of(layer: DynamicConv2d, input_size: int) -> str:
    if layer.groups > 1:
        return "depthwise"
    if all(k == 1 for k in layer.kernel_size):
        return "1x1 @>=28" if input_size >= 28 else "1x1 @<28"
    return "dense kxk"


def layer_groups(model: nn.Module) -> dict[str, str]:
    """Each dynamic layer's group (by module name), from its input size at 112² network input."""
    sizes: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: sizes.__setitem__(name, inp[0].shape[-1]))
             for name, m in model.named_modules() if isinstance(m, DynamicConv2d)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 112, 112))
    for h in hooks:
        h.remove()
    return {name: group_of(model.get_submodule(name), size) for name, size in sizes.items()}


def with_static(model: nn.Module, groups: dict[str, str], group: str) -> nn.Module:
    """A copy of ``model`` whose dynamic layers of ``group`` are plain ``nn.Conv2d`` of the same shape."""
    model = copy.deepcopy(model)
    for name, g in groups.items():
        if g != group:
            continue
        layer = model.get_submodule(name)
        conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, conv)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="mobilenet_v2", choices=["mobilenet_v2", "resnet18"])
    parser.add_argument("--figures", nargs="*", default=["batch", "train"], choices=["batch", "train"])
    parser.add_argument("--format", nargs=2, default=["channels_last", "contiguous"], choices=list(FORMATS),
                        metavar=("STATIC", "DYNAMIC"), help="memory formats of the static and the DY models")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    static, dynamic = build_network(args.network)
    groups = layer_groups(dynamic)
    present = [g for g in GROUPS if g in groups.values()]
    models = {"static": static, "DY": dynamic}
    models.update({f"DY, {g} static": with_static(dynamic, groups, g) for g in present})
    print(f"{args.network}: dynamic layers per group " + ", ".join(
        f"{g} {list(groups.values()).count(g)}" for g in present))
    for figure in args.figures:
        batch, size = (32, 224) if figure == "batch" else (32, 112)
        x = torch.randn(batch, 3, size, size)
        labels = torch.randint(0, 1000, (batch,))
        fns = {}
        for name, model in models.items():
            fmt = FORMATS[args.format[0] if name == "static" else args.format[1]]
            m = copy.deepcopy(model).to(memory_format=fmt)
            xf = x.contiguous(memory_format=fmt)
            if figure == "batch":
                fns[name] = _infer(m.eval(), xf)
            else:
                optimizer = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
                fns[name] = _train(m.train(), xf, lambda y: F.cross_entropy(y, labels), optimizer)
        med = interleaved_medians(fns, args.repeats)
        base, dy = med["static"], med["DY"]
        print(f"{figure} (batch {batch} @{size}): static {base * 1e3:.0f} ms, DY {dy / base:.2f}x")
        for name in models:
            if name.startswith("DY, "):
                saved = dy - med[name]
                print(f"  {name}: {med[name] / base:.2f}x, saves {saved * 1e3:.0f} ms = "
                      f"{saved / max(dy - base, 1e-9):.0%} of the extra")


if __name__ == "__main__":
    main()
