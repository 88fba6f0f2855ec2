"""What batch-1 inference costs, part by part: the measurements behind the README's "What bounds the rest".

    PYTHONPATH=src python benchmarks/batch1_parts.py [--part mixing attention cold-ops networks network-ops layer-ops
                                                             pointwise]

1. ``mixing``: mixing one sample's kernel, (1 x K) @ (K x N), K = 4: ``torch.mm``, ``torch.mv`` (what the
   one-sample path uses) and a scaled copy with K - 1 scaled in-place adds (what the CPU paths use from
   ``dyconv._chunked.SCALED_ADDS_MIN_ELEMENTS``: from 2^18 elements until 2026-11-29, never since; README, "Mixing
   by scaled adds"), medians of 300 calls (warm caches).
2. ``attention``: the attention's linear layers for one sample: a one-row ``addmm`` against ``addmv`` (what the
   one-sample path does), and the whole attention of a layer.
3. ``cold-ops``: small operations timed alone (warm) and right after a depthwise convolution of MobileNetV2's
   size (what a layer's extra operations meet inside a network): medians of 300.
4. ``networks``: DY-ResNet-18 / DY-MobileNetV2 against torchvision at batch 1, 224², channels_last:
   ``torch.profiler`` self CPU time per image of the convolutions and of the mixing ops (``mm``, ``mul``,
   ``add_``, and ``mv`` with the ``addmv`` it calls), 10 images, the two sides profiled twice in turn.
5. ``network-ops``: the same networks at batch 1, as ratios to static (interleaved medians of 40 settled calls,
   three rounds), with every dynamic layer's forward replaced by: ``conv only`` (the first expert's static
   convolution, no attention, no mixing: what the network costs around the layers), ``minimal ops`` (the seven
   operations of ``dyconv._one_sample`` with every tensor prepared beforehand and no checks: the least that
   eager PyTorch operators do per layer), against ``dyconv`` as shipped.
6. ``layer-ops``: the same four sides for each of the bench's layer shapes alone (``dyconv bench``'s batch-1
   layer rows), against ``nn.Conv2d``: interleaved medians of 60 settled calls, two rounds; then for a 3×3
   8->8 layer at 4×4, where each side costs little more than its dispatch (the fixed costs per call).
7. ``pointwise``: a 1×1 convolution at batch 1 as PyTorch's convolution (``F.conv2d``) against one matrix product
   (``dyconv._one_sample._pointwise``, what the dynamic layers do since 2026-11-30 for ungrouped unpadded stride-1
   1×1 kernels, except expansions with at most ``POINTWISE_CONV_MAX_POSITIONS`` positions), with the same fixed
   kernel, for each of MobileNetV2's 1×1 shapes at 224², on contiguous and on channels_last input (interleaved
   medians of 100 settled calls) and summed; then torchvision's static MobileNetV2 at batch 1 as it is against the
   same network with its 1×1 convolutions run as that product (interleaved medians of 40 settled calls, three
   rounds): how much of a dynamic network's ratio to static comes from the product rather than from the method.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types

import torch
import torch.nn.functional as F

from dyconv import DynamicConv2d, _chunked, _one_sample, layers
from dyconv.benchmark import LAYER_SHAPES, LayerShape, _infer, build_network, interleaved_medians

K = 4


def median_us(fn, calls: int = 300, before=None) -> float:
    """Median microseconds of ``fn``; ``before`` (untimed) runs just before each timed call."""
    fn()
    times = []
    for _ in range(calls):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def mixing() -> None:
    print("mixing one kernel, (1 x 4) @ (4 x N): torch.mm, torch.mv and scaled adds (us, warm)")
    for n in (1296, 13824, 147456, 409600, 2359296):
        flat, a, out = torch.randn(K, n), torch.softmax(torch.randn(1, K), 1), torch.empty(1, n)
        flat_t, a1, out1 = flat.t(), a[0], out[0]

        def adds():
            w = a[0].tolist()
            row = torch.mul(flat[0], w[0], out=out[0])
            for k in range(1, K):
                row.add_(flat[k], alpha=w[k])

        print(f"  N = {n}: mm {median_us(lambda: torch.mm(a, flat, out=out)):.1f}, "
              f"mv {median_us(lambda: torch.mv(flat_t, a1, out=out1)):.1f}, scaled adds {median_us(adds):.1f}")


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


def cold_ops() -> None:
    print("small ops, us: alone (warm) / right after a depthwise 3x3 convolution, 144 channels at 56x56, CL")
    cl = torch.channels_last
    x = torch.randn(1, 144, 56, 56).contiguous(memory_format=cl)
    w = torch.randn(144, 1, 3, 3).contiguous(memory_format=cl)
    w1, b1, s = torch.randn(36, 144), torch.randn(36), torch.randn(144)
    flat_t, a, out = torch.randn(4, 13824).t(), torch.softmax(torch.randn(4), 0), torch.empty(13824)
    ops = {
        "empty(4)": lambda: torch.empty(4),
        "relu": lambda: torch.relu(s),
        "softmax": lambda: torch.softmax(s, 0),
        "addmv 36x144": lambda: torch.addmv(b1, w1, s),
        "mv mixing 13824x4": lambda: torch.mv(flat_t, a, out=out),
        "sum of the input": lambda: x.sum([0, 2, 3]),
        "the convolution": lambda: F.conv2d(x, w, None, 1, 1, 1, 144),
    }
    with torch.inference_mode():
        for name, op in ops.items():
            warm = median_us(op)
            cold = median_us(op, before=lambda: F.conv2d(x, w, None, 1, 1, 1, 144))
            print(f"  {name}: {warm:.1f} / {cold:.1f}")


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
                events = prof.key_averages()
                per = {e.key: e.self_cpu_time_total / 10e3 for e in events}
                convs = sum(v for k, v in per.items() if "convolution" in k or "conv2d_forward" in k)
                # mv with the addmv it calls (the attention's own addmv calls are not counted)
                mv = sum(e.cpu_time_total / 10e3 for e in events if e.key == "aten::mv")
                mixes = mv + sum(per.get(k, 0.0) for k in ("aten::mm", "aten::mul", "aten::add_"))
                print(f"  {name} {side}: all ops {sum(per.values()):.1f}, convolutions {convs:.1f}, "
                      f"mm/mv/mul/add_ {mixes:.1f}")


def _prepare(layer) -> None:
    """Every tensor :func:`_minimal_ops` and :func:`_conv_only` use, made once (as ``layer._bench_prepared``)."""
    w = layer.weight.detach()
    order = _chunked.memory_order(w)
    flat = _chunked.flat_experts(w, order)
    out = torch.empty(flat.shape[1])
    fc1, fc2 = layer.router.fc1, layer.router.fc2
    layer._bench_prepared = (
        [0, 2, 3], fc1.bias.detach(), fc1.weight.detach(), fc2.bias.detach(), fc2.weight.detach(),
        1.0 / float(layer.temperature), flat.t(), out, _chunked.unflatten(out.view(1, -1), w, order)[0],
        w[0].clone())


def _conv_only(layer, x):
    return F.conv2d(x, layer._bench_prepared[-1], None, layer.stride, layer._conv_padding, layer.dilation,
                    layer.groups)


def _minimal_ops(layer, x):
    dims, b1, w1, b2, w2, scale, experts_t, out, kernel, _ = layer._bench_prepared
    hidden = torch.relu_(torch.addmv(b1, w1, x.sum(dims), alpha=1.0 / (x.shape[2] * x.shape[3])))
    attention = torch.softmax(torch.addmv(b2, w2, hidden, beta=scale, alpha=scale), 0)
    torch.mv(experts_t, attention, out=out)
    return F.conv2d(x, kernel, None, layer.stride, layer._conv_padding, layer.dilation, layer.groups)


class _Replaced(torch.nn.Module):
    """Runs ``model`` with every dynamic layer's forward replaced by ``forward``."""

    def __init__(self, model, forward):
        super().__init__()
        self.model, self.forward_ = model, forward

    def forward(self, x):
        original = layers._DynamicConvNd.forward
        layers._DynamicConvNd.forward = self.forward_
        try:
            return self.model(x)
        finally:
            layers._DynamicConvNd.forward = original


def network_ops() -> None:
    print("batch 1, 224x224, channels_last: ratio to static (interleaved medians of 40 settled calls)")
    x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    for name in ("resnet18", "mobilenet_v2"):
        static, dynamic = build_network(name)
        for model in (static, dynamic):
            model.to(memory_format=torch.channels_last).eval()
        for layer in dynamic.modules():
            if isinstance(layer, layers._DynamicConvNd):
                _prepare(layer)
        sides = {"static": _infer(static, x), "conv only": _infer(_Replaced(dynamic, _conv_only), x),
                 "minimal ops": _infer(_Replaced(dynamic, _minimal_ops), x), "dyconv": _infer(dynamic, x)}
        for _ in range(3):
            t = interleaved_medians(sides, repeats=40, warmup=3, settle=2)
            print(f"  {name}: static {1e3 * t['static']:.1f} ms; "
                  + ", ".join(f"{k} {t[k] / t['static']:.2f}x" for k in sides if k != "static"))


def layer_ops() -> None:
    print("batch 1, channels_last, the bench's layer shapes alone: ratio to static (interleaved medians of 60 "
          "settled calls, two rounds)")
    # the last shape is so small that every side costs only its dispatch: the fixed costs per call
    for shape in LAYER_SHAPES + (LayerShape("3x3 8->8 @4", 8, 8, 3, 4),):
        torch.manual_seed(0)
        static = shape.conv().to(memory_format=torch.channels_last).eval()
        dynamic = shape.conv(DynamicConv2d, num_experts=K).to(memory_format=torch.channels_last).eval()
        x = torch.randn(1, shape.in_channels, shape.size, shape.size).contiguous(memory_format=torch.channels_last)
        sides = {"static": _infer(static, x)}
        for name, forward in (("conv only", _conv_only), ("minimal ops", _minimal_ops)):
            # a copy of the layer whose own forward is replaced: called as a module, like the other two sides
            replaced = copy.deepcopy(dynamic)
            _prepare(replaced)
            replaced.forward = types.MethodType(forward, replaced)
            sides[name] = _infer(replaced, x)
        sides["dyconv"] = _infer(dynamic, x)
        rounds = []
        for _ in range(2):
            t = interleaved_medians(sides, repeats=60, warmup=3, settle=2)
            rounds.append(f"static {1e6 * t['static']:.0f} us, "
                          + ", ".join(f"{k} {t[k] / t['static']:.2f}x" for k in sides if k != "static"))
        print(f"  {shape.name}: " + "; ".join(rounds))


# MobileNetV2's 1x1 convolutions at 224x224 (in, out, size): the expansions and projections of its blocks, the
# first block's projection and the last convolution
POINTWISE_SHAPES = [(32, 16, 112), (16, 96, 112), (96, 24, 56), (24, 144, 56), (144, 24, 56), (144, 32, 28),
                    (32, 192, 28), (192, 32, 28), (192, 64, 14), (64, 384, 14), (384, 64, 14), (384, 96, 14),
                    (96, 576, 14), (576, 96, 14), (576, 160, 7), (160, 960, 7), (960, 160, 7), (960, 320, 7),
                    (320, 1280, 7)]


class _ProductConv(torch.nn.Module):
    """A static 1×1 ``nn.Conv2d`` run as :func:`dyconv._one_sample._pointwise` (the convolution where it does not
    apply)."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.matrix = conv.weight.detach().reshape(conv.out_channels, conv.in_channels)

    def forward(self, x):
        c = self.conv
        bias = None if c.bias is None else c.bias.detach()
        y = _one_sample._pointwise(x, self.matrix, bias, list(c.stride), list(c.padding), c.groups)  # its rule
        return c(x) if y is None else y


def _with_products(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose ungrouped 1×1 ``nn.Conv2d`` modules are :class:`_ProductConv`."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Conv2d and child.kernel_size == (1, 1) and child.groups == 1:
                setattr(module, name, _ProductConv(child))
    return model


def _pointwise_shapes(fmt: torch.memory_format) -> None:
    totals = {"conv": 0.0, "product": 0.0}
    for c_in, c_out, size in POINTWISE_SHAPES:
        x = torch.randn(1, c_in, size, size).contiguous(memory_format=fmt)
        w = torch.randn(c_out, c_in, 1, 1).contiguous(memory_format=fmt)
        matrix = w.reshape(c_out, c_in)
        sides = {"conv": lambda: F.conv2d(x, w),
                 "product": lambda: _one_sample._pointwise(x, matrix, None, [1, 1], [0, 0], 1)}
        torch.testing.assert_close(sides["product"](), sides["conv"](), rtol=1e-4, atol=1e-4)
        t = interleaved_medians(sides, repeats=100, warmup=3, settle=2)
        totals = {k: v + 1e6 * t[k] for k, v in totals.items()}
        print(f"  {fmt}, {c_in}->{c_out} @{size}: conv {1e6 * t['conv']:.0f}, product {1e6 * t['product']:.0f} "
              f"({t['product'] / t['conv']:.2f}x)")
    print(f"  {fmt}, all {len(POINTWISE_SHAPES)}: conv {totals['conv']:.0f}, product {totals['product']:.0f}")


def pointwise() -> None:
    print("batch 1, MobileNetV2's 1x1 shapes at 224: F.conv2d against one matrix product (interleaved medians of "
          "100 settled calls, us)")
    rule = _one_sample.POINTWISE_CONV_MAX_POSITIONS
    _one_sample.POINTWISE_CONV_MAX_POSITIONS = -1  # the product for every shape here, expansions included
    try:
        with torch.inference_mode():
            for fmt in (torch.contiguous_format, torch.channels_last):
                _pointwise_shapes(fmt)
    finally:
        _one_sample.POINTWISE_CONV_MAX_POSITIONS = rule
    print("batch 1, 224x224, channels_last: torchvision's static MobileNetV2 with its 1x1 convolutions as the product "
          "(by the layers' rule)")
    x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    static, _ = build_network("mobilenet_v2")
    static = static.to(memory_format=torch.channels_last).eval()
    sides = {"static": _infer(static, x), "static, 1x1 as products": _infer(_with_products(static), x)}
    for _ in range(3):
        t = interleaved_medians(sides, repeats=40, warmup=3, settle=2)
        print(f"  static {1e3 * t['static']:.1f} ms, with products {1e3 * t['static, 1x1 as products']:.1f} ms "
              f"({t['static, 1x1 as products'] / t['static']:.2f}x)")


PARTS = {"mixing": mixing, "attention": attention, "cold-ops": cold_ops, "networks": networks,
         "network-ops": network_ops, "layer-ops": layer_ops, "pointwise": pointwise}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=list(PARTS), default=list(PARTS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, 2 threads")
    for part in args.part:
        PARTS[part]()


if __name__ == "__main__":
    main()
