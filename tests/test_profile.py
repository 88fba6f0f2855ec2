"""``dyconv.profile`` against counts derived by hand from the layers' shapes (formulas written here)."""

import math

import pytest
import torch
from torch import nn

import dyconv
from dyconv.cli import main
from dyconv.profile import Profile, count_madds


def conv_madds(cin, cout, kernel, out_size, groups=1):
    """One convolution: every output element is a dot product of (cin / groups) × kernel taps."""
    return cout * math.prod(out_size) * (cin // groups) * math.prod(kernel)


def out_len(n, k, s, p):
    return (n + 2 * p - k) // s + 1


@pytest.mark.parametrize("cin,cout,k,s,p,groups,size", [
    (3, 8, 3, 1, 1, 1, 32),
    (16, 32, 3, 2, 1, 1, 15),
    (24, 24, 5, 2, 2, 24, 17),  # depthwise
    (12, 18, 1, 1, 0, 3, 9),  # grouped 1×1
])
def test_static_conv2d_by_formula(cin, cout, k, s, p, groups, size):
    conv = nn.Conv2d(cin, cout, k, s, p, groups=groups)
    prof = dyconv.profile(conv, (1, cin, size, size))
    o = out_len(size, k, s, p)
    assert prof.madds == conv_madds(cin, cout, (k, k), (o, o), groups)
    assert prof.params == cout * cin // groups * k * k + cout
    assert prof.dynamic_layers == 0 and prof.overhead_madds == 0 and prof.static_madds == prof.madds


def test_linear_and_batch_scaling():
    lin = nn.Linear(20, 7)
    assert dyconv.profile(lin, (1, 20)).madds == 140
    assert dyconv.profile(lin, (5, 20)).madds == 5 * 140


@pytest.mark.parametrize("rank,cin,cout,k,s,p,groups,size,bias,experts", [
    (2, 16, 32, 3, 1, 1, 1, 14, True, 4),  # k×k: aggregate-then-convolve at batch 1
    (2, 32, 64, 1, 1, 0, 1, 7, False, 4),  # 1×1: matrix product
    (2, 48, 48, 3, 2, 1, 48, 9, False, 6),  # depthwise, strided
    (1, 25, 25, 3, 2, 1, 1, 19, True, 4),  # cnn1d's dynamic layer
    (3, 4, 8, 3, 1, 1, 2, 6, True, 2),
])
def test_dynamic_conv_by_formula(rank, cin, cout, k, s, p, groups, size, bias, experts):
    cls = {1: dyconv.DynamicConv1d, 2: dyconv.DynamicConv2d, 3: dyconv.DynamicConv3d}[rank]
    layer = cls(cin, cout, k, s, p, groups=groups, bias=bias, num_experts=experts)
    prof = dyconv.profile(layer, (1, cin) + (size,) * rank)
    hidden = max(cin // 4, 4)
    conv = conv_madds(cin, cout, (k,) * rank, (out_len(size, k, s, p),) * rank, groups)
    attention = cin * hidden + hidden * experts  # the two linear layers (pool not counted)
    mixing = experts * cout * (cin // groups) * k ** rank + (experts * cout if bias else 0)
    assert prof.dynamic_layers == 1
    assert prof.attention_madds == attention
    assert prof.mixing_madds == mixing
    assert prof.static_madds == conv
    assert prof.madds == conv + attention + mixing
    assert prof.attention_params == cin * hidden + hidden + hidden * experts + experts
    assert prof.params == experts * cout * (cin // groups) * k ** rank + (experts * cout if bias else 0) \
        + prof.attention_params


def test_whole_model_is_the_sum_of_its_layers():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), dyconv.DynamicConv2d(16, 16, 3, padding=1),
                          nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    prof = dyconv.profile(model, (1, 3, 32, 32))
    stem = conv_madds(3, 16, (3, 3), (16, 16))
    dynamic = conv_madds(16, 16, (3, 3), (16, 16)) + (16 * 4 + 4 * 4) + (4 * 16 * 16 * 9 + 4 * 16)
    assert prof.madds == stem + dynamic + 16 * 10
    assert prof.static_madds == stem + conv_madds(16, 16, (3, 3), (16, 16)) + 16 * 10


def test_modes_restored_and_no_gradients():
    model = dyconv.create_model("dy_cnn1d", num_classes=10, in_channels=1)
    model.train()
    model.conv2.eval()
    dyconv.profile(model, (1, 1, 40))
    assert model.training and model.conv1.training and not model.conv2.training
    assert all(p.grad is None for p in model.parameters())


def test_meta_and_cpu_give_the_same_profile():
    cpu = dyconv.create_model("dy_mobilenetv2_035", num_classes=10)
    with torch.device("meta"):
        meta = dyconv.create_model("dy_mobilenetv2_035", num_classes=10)
    assert dyconv.profile(cpu, (1, 3, 64, 64)) == dyconv.profile(meta, (1, 3, 64, 64))
    # batch 2: the deep layers' tiny outputs take the same strategy on both (meta follows the CPU's rules)
    assert dyconv.profile(cpu, (2, 3, 64, 64)) == dyconv.profile(meta, (2, 3, 64, 64))


@pytest.mark.parametrize("bad", [(3, 224, 224, 0), (1,), "1x3x224x224", (1, 3.0, 8, 8)])
def test_bad_input_size_is_named(bad):
    with pytest.raises(ValueError, match="input_size"):
        dyconv.profile(nn.Conv2d(3, 4, 1), bad)


def test_profile_is_the_function_and_prints():
    import dyconv.profile as module  # noqa: F401  (importing the module must not hide the function)

    assert callable(dyconv.profile) and dyconv.profile.__name__ == "profile"
    text = str(dyconv.profile(dyconv.DynamicConv2d(8, 8, 3), (1, 8, 10, 10)))
    assert "1 dynamic layers" in text and "params" in text
    assert isinstance(dyconv.profile(nn.Linear(2, 2), (1, 2)), Profile)


def test_count_madds_matmul():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_madds(lambda: a @ b) == 3 * 5 * 7


def test_cli_models_table(capsys):
    assert main(["models", "--pattern", "*cnn1d"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| model |") and len(lines) == 4
    assert lines[2].startswith("| cnn1d | 1×1×40 | 5.21K |")  # 150 + 1900 + 1900 + 1260 parameters
    assert lines[3].startswith("| dy_cnn1d |")
