"""Every per-sample convolution strategy, called directly, against the nn.ConvNd reference."""

import pytest
import torch

from dyconv import DynamicConv1d, DynamicConv2d, DynamicConv3d
from dyconv.functional import STRATEGIES, apply_padding, dynamic_conv, select_strategy
from reference import TOL, manual_attention, per_sample_reference

LAYER = {1: DynamicConv1d, 2: DynamicConv2d, 3: DynamicConv3d}
SPATIAL = {1: (13,), 2: (9, 10), 3: (5, 6, 7)}
CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, dilation=2, padding=2),
    dict(kernel_size=3, groups=2, padding=1),
    dict(kernel_size=3, groups=4, padding="same", padding_mode="reflect"),  # depthwise
    dict(kernel_size=2, padding="same"),
    dict(kernel_size=1),
    dict(kernel_size=1, stride=2, groups=2),
]


def run(layer, x, strategy):
    attention = layer.attention(x)
    return dynamic_conv(x, layer.weight, layer.bias, attention, layer.stride, layer._padding_pairs, layer.dilation,
                        layer.groups, layer.padding_mode, strategy)


def applicable(strategy, layer):
    one_by_one = all(k == 1 for k in layer.kernel_size) and not any(layer._padding_pairs)
    return strategy != "matmul" or one_by_one


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_strategy_matches_reference(strategy, rank, case, batch):
    layer = LAYER[rank](4, 8, **case, num_experts=3, temperature=2.0, dtype=torch.float64)
    if not applicable(strategy, layer):
        pytest.skip("matmul is for unpadded 1x1 kernels")
    x = torch.randn(batch, 4, *SPATIAL[rank], dtype=torch.float64)
    torch.testing.assert_close(run(layer, x, strategy), per_sample_reference(layer, x), **TOL[torch.float64])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_gradients_agree(strategy):
    layer = DynamicConv2d(4, 8, 1 if strategy == "matmul" else 3, num_experts=3, dtype=torch.float64)
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    ref_grads = torch.autograd.grad(run(layer, x, "loop").square().sum(), [x, layer.weight, layer.bias])
    grads = torch.autograd.grad(run(layer, x, strategy).square().sum(), [x, layer.weight, layer.bias])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


def test_attention_need_not_be_a_softmax():
    layer = DynamicConv2d(4, 6, 3, num_experts=2, dtype=torch.float64)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    attention = torch.tensor([[2.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
    for strategy in ["groups", "loop", "unfold", "experts"]:
        torch.testing.assert_close(run_with(layer, x, attention, strategy),
                                   per_sample_reference(layer, x, attention), **TOL[torch.float64])


def run_with(layer, x, attention, strategy):
    return dynamic_conv(x, layer.weight, layer.bias, attention, layer.stride, layer._padding_pairs, layer.dilation,
                        layer.groups, layer.padding_mode, strategy)


def test_auto_picks_by_shape():
    w3, w1 = torch.zeros(4, 8, 8, 3, 3), torch.zeros(4, 8, 8, 1, 1)
    assert select_strategy(torch.zeros(1, 8, 5, 5), w3, [1, 1], 1) == "loop"
    assert select_strategy(torch.zeros(4, 8, 5, 5), w3, [1, 1], 1) == "groups"
    assert select_strategy(torch.zeros(4, 8, 5, 5), w1, [0, 0], 1) == "matmul"


def test_padding_is_left_to_the_conv_when_it_can():
    x = torch.randn(1, 2, 5, 5)
    same, conv_pad = apply_padding(x, [1, 1, 2, 2], "zeros")
    assert same is x and conv_pad == [1, 2]
    padded, conv_pad = apply_padding(x, [0, 1, 1, 1], "zeros")
    assert padded.shape == (1, 2, 6, 7) and conv_pad == [0, 0]


def test_errors():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(3, 4, 4, 3, 3)
    a = torch.softmax(torch.randn(2, 3), 1)
    with pytest.raises(ValueError, match="strategy='bogus'"):
        dynamic_conv(x, w, None, a, [1, 1], [0, 0, 0, 0], [1, 1], 1, "zeros", "bogus")
    with pytest.raises(ValueError, match="1x1 kernels"):
        dynamic_conv(x, w, None, a, [1, 1], [0, 0, 0, 0], [1, 1], 1, "zeros", "matmul")
