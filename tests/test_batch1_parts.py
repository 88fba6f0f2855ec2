"""The sides that benchmarks/batch1_parts.py times against the shipped layer compute what they stand for: "minimal
ops" the layer's batch-1 output (a floor measured on another computation would bound nothing), "conv only" the
first expert's static convolution."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from dyconv import DynamicConv2d
from dyconv.benchmark import LayerShape
import benchmark_scripts

batch1_parts = benchmark_scripts.load("batch1_parts")

SHAPES = [LayerShape("3x3", 4, 6, 3, 5), LayerShape("3x3 stride 2", 4, 6, 3, 6, stride=2),
          LayerShape("depthwise", 8, 8, 3, 5, groups=8), LayerShape("1x1", 4, 6, 1, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["C", "CL"])
def test_minimal_ops_and_conv_only_compute_the_layer(shape, memory_format):
    torch.manual_seed(0)
    layer = shape.conv(DynamicConv2d, num_experts=4, temperature=3.0).to(memory_format=memory_format).eval()
    x = torch.randn(1, shape.in_channels, shape.size, shape.size).contiguous(memory_format=memory_format)
    sides = {}
    for name, forward in (("conv only", batch1_parts._conv_only), ("minimal ops", batch1_parts._minimal_ops)):
        replaced = copy.deepcopy(layer)  # as layer_ops builds them
        batch1_parts._prepare(replaced)
        replaced.forward = types.MethodType(forward, replaced)
        sides[name] = replaced
    with torch.inference_mode():
        expected = layer(x)
        for _ in range(2):  # the prepared workspace is written again on every call
            torch.testing.assert_close(sides["minimal ops"](x), expected, rtol=1e-5, atol=1e-5)
        first = F.conv2d(x, layer.weight[0], None, layer.stride, layer.padding, layer.dilation, layer.groups)
        torch.testing.assert_close(sides["conv only"](x), first, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(expected, first, rtol=1e-3, atol=1e-3)  # the two sides differ
