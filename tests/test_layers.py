"""The kornia set for DynamicConv1d/2d/3d: smoke, errors, shapes, reference numbers, invariants, gradcheck."""

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

import dyconv
from dyconv import DynamicConv1d, DynamicConv2d, DynamicConv3d
from op_calls import top_level_ops
from reference import CONV, TOL, manual_attention, per_sample_reference

LAYER = {1: DynamicConv1d, 2: DynamicConv2d, 3: DynamicConv3d}
SPATIAL = {1: (11,), 2: (9, 8), 3: (5, 6, 7)}

# (name, conv kwargs) covering groups (incl. depthwise), stride, dilation, every padding form and mode
CONFIGS = [
    ("plain", dict(in_channels=4, out_channels=6, kernel_size=3)),
    ("pad1", dict(in_channels=4, out_channels=6, kernel_size=3, padding=1)),
    ("stride2", dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1)),
    ("dilation2", dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding=2)),
    ("groups2", dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1)),
    ("depthwise", dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, padding=1)),
    ("depthwise_mult2_stride2", dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, stride=2, padding=1)),
    ("pointwise", dict(in_channels=4, out_channels=6, kernel_size=1)),
    ("pointwise_stride2", dict(in_channels=4, out_channels=6, kernel_size=1, stride=2)),
    ("pointwise_groups", dict(in_channels=4, out_channels=6, kernel_size=1, groups=2)),
    ("same_odd", dict(in_channels=4, out_channels=5, kernel_size=3, padding="same")),
    ("same_even_dilated", dict(in_channels=4, out_channels=5, kernel_size=2, padding="same", dilation=2)),
    ("valid", dict(in_channels=4, out_channels=5, kernel_size=2, padding="valid")),
    ("reflect", dict(in_channels=4, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect")),
    ("replicate_stride2", dict(in_channels=4, out_channels=5, kernel_size=3, padding=1, stride=2,
                               padding_mode="replicate")),
    ("circular_groups", dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=2,
                             padding_mode="circular")),
    ("same_reflect", dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", padding_mode="reflect")),
]
TUPLE_CONFIGS = {
    1: dict(in_channels=3, out_channels=4, kernel_size=(3,), stride=(2,), padding=(2,), dilation=(2,)),
    2: dict(in_channels=3, out_channels=4, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    3: dict(in_channels=3, out_channels=4, kernel_size=(1, 3, 2), stride=(1, 2, 1), padding=(0, 1, 1)),
}


def make(rank, num_experts=3, bias=True, dtype=torch.float64, **kwargs):
    return LAYER[rank](**kwargs, bias=bias, num_experts=num_experts, temperature=1.5, dtype=dtype)


def make_input(rank, layer, batch, dtype=torch.float64):
    return torch.randn(batch, layer.in_channels, *SPATIAL[rank], dtype=dtype)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("num_experts,bias,batch,train", [(1, True, 2, True), (3, False, 1, False),
                                                          (4, True, 3, False), (6, True, 2, True)])
def test_matches_per_sample_reference(rank, name, kwargs, num_experts, bias, batch, train):
    layer = make(rank, num_experts, bias, **kwargs).train(train)
    x = make_input(rank, layer, batch)
    torch.testing.assert_close(layer(x), per_sample_reference(layer, x), **TOL[torch.float64])


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("num_experts", [1, 2, 5])
def test_tuple_arguments_match_reference(rank, num_experts):
    layer = make(rank, num_experts, **TUPLE_CONFIGS[rank])
    x = make_input(rank, layer, 3)
    torch.testing.assert_close(layer(x), per_sample_reference(layer, x), **TOL[torch.float64])


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_attention_is_the_specified_branch(rank):
    layer = make(rank, 5, in_channels=8, out_channels=4, kernel_size=3)
    x = make_input(rank, layer, 4)
    attention = layer.attention(x)
    torch.testing.assert_close(attention, manual_attention(layer, x), **TOL[torch.float64])
    assert attention.shape == (4, 5)
    assert (attention >= 0).all() and (attention <= 1).all()
    torch.testing.assert_close(attention.sum(1), torch.ones(4, dtype=torch.float64))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in layer.modules())


def test_attention_hidden_size_has_a_minimum():
    assert DynamicConv2d(3, 8, 3).router.fc1.out_features == 4  # RGB stem: 3 // 4 == 0 -> 4
    assert DynamicConv2d(64, 8, 3).router.fc1.out_features == 16
    assert DynamicConv2d(64, 8, 3, reduction=8).router.fc1.out_features == 8


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("name,kwargs", CONFIGS[:9], ids=[c[0] for c in CONFIGS[:9]])
def test_one_expert_equals_conv(rank, name, kwargs):
    layer = make(rank, 1, **kwargs)
    conv = CONV[rank](**kwargs, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(layer.weight[0])
        conv.bias.copy_(layer.bias[0])
    x = make_input(rank, layer, 3)
    torch.testing.assert_close(layer(x), conv(x), **TOL[torch.float64])


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_identical_experts_equal_conv_whatever_the_attention(rank, name, kwargs):
    layer = make(rank, 4, **kwargs)
    conv = CONV[rank](**kwargs, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(conv.weight.expand_as(layer.weight))
        layer.bias.copy_(conv.bias.expand_as(layer.bias))
        layer.router.fc2.weight.normal_(0, 10)  # a far from uniform attention
    x = make_input(rank, layer, 3)
    torch.testing.assert_close(layer(x), conv(x), **TOL[torch.float64])


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_sample_independent_of_batch_mates(rank, train):
    layer = make(rank, 4, in_channels=4, out_channels=6, kernel_size=3, padding=1).train(train)
    x = make_input(rank, layer, 5)
    others = make_input(rank, layer, 5)
    alone = layer(x[2:3])
    mixed = torch.cat([others[:2], x[2:3], others[3:]])
    torch.testing.assert_close(layer(mixed)[2:3], alone, **TOL[torch.float64])
    torch.testing.assert_close(layer(x)[2:3], alone, **TOL[torch.float64])


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_unbatched_input_like_conv(rank):
    layer = make(rank, 3, in_channels=4, out_channels=6, kernel_size=3, padding=1)
    x = make_input(rank, layer, 1)
    out = layer(x[0])
    assert out.shape == layer(x).shape[1:]
    torch.testing.assert_close(out, layer(x)[0], **TOL[torch.float64])


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=1),
                                    dict(kernel_size=3, padding="same", dilation=3),
                                    dict(kernel_size=2, padding=(1,) * 3, stride=3)])
def test_output_shape_equals_conv(rank, kwargs):
    if isinstance(kwargs.get("padding"), tuple):
        kwargs = dict(kwargs, padding=kwargs["padding"][:rank])
    layer = LAYER[rank](4, 8, **kwargs)
    conv = CONV[rank](4, 8, **kwargs)
    x = torch.randn(2, 4, *SPATIAL[rank])
    assert layer(x).shape == conv(x).shape


def test_batch_one_trains():
    torch.manual_seed(0)
    model = nn.Sequential(DynamicConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          DynamicConv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(1, 3, 12, 12), torch.tensor([1])
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_backward_reaches_every_parameter(rank):
    layer = make(rank, 3, in_channels=4, out_channels=6, kernel_size=3, padding=1)
    layer(make_input(rank, layer, 2)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, groups=2, stride=2),
                                    dict(kernel_size=1)])
def test_gradcheck(rank, kwargs):
    layer = make(rank, 3, in_channels=2, out_channels=4, **kwargs)
    x = torch.randn(2, 2, *[5] * rank, dtype=torch.float64, requires_grad=True)
    params = (layer.weight, layer.bias, layer.router.fc1.weight, layer.router.fc2.weight)

    def fn(x, *ps):
        names = ["weight", "bias", "router.fc1.weight", "router.fc2.weight"]
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


def test_temperature_is_state_and_round_trips():
    layer = DynamicConv2d(4, 6, 3, temperature=7.0)
    assert "temperature" in layer.state_dict()
    assert float(layer.state_dict()["temperature"]) == 7.0
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    fresh = DynamicConv2d(4, 6, 3)  # default 30
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert float(fresh.temperature) == 7.0
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(fresh(x), layer(x))


def test_temperature_changes_attention_sharpness():
    layer = DynamicConv2d(8, 8, 3)
    with torch.no_grad():
        layer.router.fc2.weight.normal_(0, 1)
    x = torch.randn(4, 8, 6, 6)
    dyconv.set_temperature(layer, 100.0)
    flat = layer.attention(x)
    dyconv.set_temperature(layer, 0.01)
    sharp = layer.attention(x)
    assert flat.max() < 0.3 and sharp.max(1).values.min() > 0.99


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_reset_parameters_initialises_each_expert_like_conv(rank):
    torch.manual_seed(1)
    layer = LAYER[rank](16, 32, 3, num_experts=4)
    conv = CONV[rank](16, 32, 3)
    w_bound = 1 / math.sqrt(16 * 3**rank)  # kaiming_uniform(a=sqrt(5)) bound == 1/sqrt(fan_in)
    for k in range(4):
        assert layer.weight[k].abs().max() <= w_bound
        assert layer.weight[k].abs().max() > 0.9 * w_bound
        assert layer.bias[k].abs().max() <= w_bound
        assert abs(layer.weight[k].std() - conv.weight.std()) < 0.1 * conv.weight.std()
    assert not torch.allclose(layer.weight[0], layer.weight[1])  # independent experts
    before = layer.weight.clone()
    layer.reset_parameters()
    assert not torch.allclose(before, layer.weight)


def test_parameter_shapes():
    layer = DynamicConv3d(8, 12, (3, 1, 2), groups=4, num_experts=5)
    assert layer.weight.shape == (5, 12, 2, 3, 1, 2)
    assert layer.bias.shape == (5, 12)
    assert DynamicConv1d(4, 4, 3, bias=False).bias is None


def test_constructor_is_drop_in_for_conv():
    positional = (4, 8, 3, 2, 1, 1, 2, False, "reflect")
    layer = DynamicConv2d(*positional)
    conv = nn.Conv2d(*positional)
    for attr in ["in_channels", "out_channels", "kernel_size", "groups", "padding", "padding_mode"]:
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert tuple(layer.stride) == conv.stride and tuple(layer.dilation) == conv.dilation
    assert layer.bias is None


def test_extra_repr():
    text = repr(DynamicConv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False, num_experts=6))
    for part in ["4, 8", "kernel_size=(3, 3)", "stride=(2, 2)", "padding=(1, 1)", "groups=2", "bias=False",
                 "num_experts=6"]:
        assert part in text, part


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_non_contiguous_input(rank):
    layer = make(rank, 3, in_channels=4, out_channels=6, kernel_size=3, padding=1)
    x = make_input(rank, layer, 3)
    x_nc = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    assert not x_nc.is_contiguous()
    torch.testing.assert_close(layer(x_nc), layer(x), **TOL[torch.float64])
    torch.testing.assert_close(layer(x[::2]), per_sample_reference(layer, x[::2]), **TOL[torch.float64])


@pytest.mark.parametrize("kernel_size,groups", [(3, 1), (1, 1), (3, 8)])
def test_channels_last(kernel_size, groups):
    layer = DynamicConv2d(8, 8, kernel_size, padding=kernel_size // 2, groups=groups, dtype=torch.float64)
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    out = layer.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
    layer3 = DynamicConv3d(4, 4, 3, padding=1, dtype=torch.float64)
    x3 = torch.randn(2, 4, 4, 5, 6, dtype=torch.float64)
    out3 = layer3(x3.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out3, per_sample_reference(layer3, x3), **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("grad", [True, False])
def test_autocast(dtype, batch, input_dtype, grad):
    """Under autocast, with float32 input or input already in the autocast dtype (what a preceding autocast
    layer hands on), at batch 1 (the one-sample shortcuts) and batch 4, with and without gradients."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        with torch.autocast(device_type=device, dtype=dtype):
            torch.nn.functional.linear(torch.ones(1, 2, device=device), torch.ones(2, 2, device=device))
    except RuntimeError as err:  # pragma: no cover - an autocast dtype the device lacks
        pytest.skip(str(err))
    layer = DynamicConv2d(8, 16, 3, padding=1, device=device)
    x = torch.randn(batch, 8, 10, 10, device=device)
    with torch.autocast(device_type=device, dtype=dtype), torch.set_grad_enabled(grad):
        out = layer(x if input_dtype == "float32" else x.to(dtype))
    assert out.dtype == dtype
    ref = per_sample_reference(layer.double(), x.double()).float()
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


def test_deepcopy_and_pickle():
    layer = DynamicConv1d(4, 6, 3, temperature=3.0)
    x = torch.randn(2, 4, 10)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(clone(x), layer(x))
        assert float(clone.temperature) == 3.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    layer = DynamicConv2d(8, 16, 3, padding=1, groups=2, dtype=torch.float64)
    x = torch.randn(3, 8, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(copy.deepcopy(layer).cuda()(x.cuda()).cpu(), layer(x), **TOL[torch.float64])


def test_inside_sequential_and_state_dict_of_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), DynamicConv2d(8, 8, 3, temperature=2.0), nn.ReLU())
    keys = model.state_dict().keys()
    assert {"1.weight", "1.bias", "1.temperature", "1.router.fc1.weight", "1.router.fc2.bias"} <= set(keys)
    assert model(torch.randn(2, 3, 10, 10)).shape == (2, 8, 6, 6)


# --- errors name the bad value ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_experts=0), ValueError, r"num_experts.*Received: num_experts=0"),
    (dict(num_experts=2.5), TypeError, r"num_experts=2.5"),
    (dict(temperature=0.0), ValueError, r"temperature.*Received: temperature=0.0"),
    (dict(temperature=-1), ValueError, r"temperature=-1"),
    (dict(temperature=float("nan")), ValueError, r"temperature=nan"),
    (dict(groups=3), ValueError, r"in_channels must be divisible by groups.*in_channels=4, groups=3"),
    (dict(in_channels=6, groups=3), ValueError, r"out_channels must be divisible by groups.*out_channels=8"),
    (dict(reduction=0), ValueError, r"reduction=0"),
    (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size=\(3, 3, 3\)"),
    (dict(kernel_size=0), ValueError, r"kernel_size=0"),
    (dict(stride=0), ValueError, r"stride=0"),
    (dict(padding=-1), ValueError, r"padding=-1"),
    (dict(padding="full"), ValueError, r"padding='full'"),
    (dict(padding="same", stride=2), ValueError, r"padding='same'.*stride=\(2, 2\)"),
    (dict(padding_mode="mirror"), ValueError, r"padding_mode='mirror'"),
    (dict(kernel_size="3"), TypeError, r"kernel_size='3'"),
    (dict(strategy="fastest"), ValueError, r"strategy='fastest'"),
])
def test_constructor_errors(kwargs, exc, match):
    args = dict(in_channels=4, out_channels=8, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        DynamicConv2d(**args)


@pytest.mark.parametrize("shape", [(2, 5, 8, 8), (2, 4, 8), (2, 4, 8, 8, 8), (8,)])
def test_wrong_input_errors(shape):
    layer = DynamicConv2d(4, 8, 3)
    with pytest.raises(ValueError, match=r"Received: input shape \[" + ", ".join(map(str, shape)) + r"\]"):
        layer(torch.randn(shape))


def test_set_temperature_errors():
    with pytest.raises(ValueError, match=r"temperature=0"):
        dyconv.set_temperature(DynamicConv2d(4, 4, 3), 0)


@pytest.fixture(params=["dense", "compiled", "operators"])
def one_sample_route(request, monkeypatch):
    """Batch-1 inference by the compiled CPU kernel: ``dense`` (ungrouped stride-1 layers with kernels larger than
    1×1: the attention, then the kernel that mixes inside the convolution's tiles; the others as ``compiled``),
    ``compiled`` (attention and mixing in one call, then the convolution), or by PyTorch operators (where the
    kernel cannot be built, or is switched off): all must be exact."""
    if request.param == "operators":
        monkeypatch.setattr(dyconv._cpu_kernel, "one_sample_mix_applies", lambda *args: False)
    elif not dyconv._cpu_kernel.available():
        pytest.skip("the compiled CPU kernel is not available here")
    if request.param != "dense":
        monkeypatch.setattr(dyconv._cpu_kernel, "DENSE_MAX_POSITIONS", -1)
    return request.param


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("bias", [True, False])
def test_one_sample_inference_path_matches_reference(rank, name, kwargs, bias, monkeypatch, one_sample_route):
    """Batch 1 without gradients takes the lean path (zero symmetric padding) or falls back; both exact."""
    layer = make(rank, 3, bias, **kwargs).eval()
    x = make_input(rank, layer, 1)
    used, dense = [], []
    real, real_dense = type(layer)._infer_one, dyconv.functional._dense_kernel_suits

    def infer_one(self, x):
        out = real(self, x)
        used.append(out is not None)
        return out

    monkeypatch.setattr(type(layer), "_infer_one", infer_one)
    monkeypatch.setattr(dyconv.functional, "_dense_kernel_suits",
                        lambda *args: dense.append(real_dense(*args)) or dense[-1])
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
    zero_symmetric = layer.padding_mode == "zeros" and layer._padding_pairs[0::2] == layer._padding_pairs[1::2]
    assert used == [zero_symmetric]  # the lean path where the convolution pads, the general one otherwise
    plain = layer.groups == 1 and set(layer.stride) == {1} and layer.weight[0, 0, 0].numel() > 1
    plain = plain and out[0, 0].numel() <= dyconv._cpu_kernel.DENSE_MAX_POSITIONS
    # the compiled dense kernel for ungrouped stride-1 layers with small outputs, through either path
    assert any(dense) == (plain and one_sample_route == "dense")
    with torch.no_grad():  # the general path gives the same numbers
        torch.testing.assert_close(out, layer(torch.cat([x, x]))[:1], **TOL[torch.float64])
    used.clear()
    layer(x)  # with gradients enabled the lean path is not tried
    assert not used


@pytest.mark.parametrize("scaled_adds", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_sample_path_for_large_kernels_and_channels_last(channels_last, scaled_adds, monkeypatch):
    """A large kernel (2^18 elements) is mixed by one matrix-vector product by default, and by scaled adds where
    SCALED_ADDS_MIN_ELEMENTS admits it; channels_last experts in their order; the one-sample path uses
    matrix-vector products (attention, bias) and no matrix product. All against the reference, and the attention
    equals the batched computation's. (The PyTorch operators' path: the compiled kernel's one call is switched off
    here, and tested in test_cpu_kernel.py.)"""
    monkeypatch.setattr(dyconv._cpu_kernel, "one_sample_mix_applies", lambda *args: False)
    layer = DynamicConv2d(64, 512, 3, padding=1, num_experts=3, temperature=2.0, dtype=torch.float64).eval()
    if scaled_adds:
        monkeypatch.setattr(dyconv._chunked, "SCALED_ADDS_MIN_ELEMENTS", 1 << 18)
    assert (layer.weight[0].numel() >= dyconv._chunked.SCALED_ADDS_MIN_ELEMENTS) == scaled_adds
    x = torch.randn(1, 64, 5, 4, dtype=torch.float64)
    ref = per_sample_reference(layer, x)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        assert not layer.weight.is_contiguous()
    mms, mvs, muls = [], [], []
    monkeypatch.setattr(torch, "mm", _spy(torch.mm, mms))
    monkeypatch.setattr(torch, "mv", _spy(torch.mv, mvs))
    monkeypatch.setattr(torch, "mul", _spy(torch.mul, muls))
    with torch.no_grad():
        out = layer(x)
    if scaled_adds:
        assert not mms and len(mvs) == 1 and len(muls) == 1  # bias by mv; kernel by one scaled copy (and adds)
    else:
        assert not mms and len(mvs) == 2 and not muls  # kernel and bias by mv
    with torch.no_grad():
        torch.testing.assert_close(layer.attention(x), layer.attention(torch.cat([x, x]))[:1], **TOL[torch.float64])
    torch.testing.assert_close(out, ref, **TOL[torch.float64])


def _counting_products(layer, x):
    """The layer's output for ``x`` without gradients, with the matrix products (``mm``, ``addmm``) and the
    convolutions it called."""
    with torch.no_grad():
        out, ops = top_level_ops(lambda: layer(x))
    products = [op for op in ops if op in ("aten::mm", "aten::addmm")]
    convs = [op for op in ops if op in ("aten::conv1d", "aten::conv2d", "aten::conv3d")]
    return out, products, convs


POINTWISE_SPATIAL = {1: (197,), 2: (15, 14), 3: (4, 5, 10)}  # more positions than POINTWISE_CONV_MAX_POSITIONS


@pytest.mark.parametrize("channels", [(7, 5), (5, 7)], ids=["projection", "expansion"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank,layout", [(1, "contiguous"), (2, "contiguous"), (2, "channels_last"),
                                         (3, "contiguous"), (2, "channels_last sliced"), (2, "contiguous sliced")])
def test_one_sample_1x1_as_one_matrix_product(rank, layout, bias, transposed, channels, monkeypatch,
                                              one_sample_route):
    """An ungrouped unpadded stride-1 1x1 layer at batch 1, on contiguous or channels_last 2-D input, is one matrix
    product of the mixed kernel (``mm``, or ``addmm`` with the mixed bias) and no convolution; its output is laid
    out as the convolution's, may be modified in place and matches the reference, also where the experts lie in
    memory with the input channels first (``transposed``) and where the input is one sample sliced out of a batch
    (``sliced``: its memory starts past the batch's). Expansions only with more output positions than
    ``POINTWISE_CONV_MAX_POSITIONS``."""
    assert all(math.prod(s) > dyconv._one_sample.POINTWISE_CONV_MAX_POSITIONS for s in POINTWISE_SPATIAL.values())
    layer = make(rank, 3, bias, in_channels=channels[0], out_channels=channels[1], kernel_size=1).eval()
    if transposed:
        w = layer.weight.detach()
        layer.weight = nn.Parameter(w.transpose(1, 2).contiguous().transpose(1, 2))
        assert not layer.weight.is_contiguous()
    spatial = POINTWISE_SPATIAL[rank] if channels[1] > channels[0] else SPATIAL[rank]
    x = torch.randn(3, channels[0], *spatial, dtype=torch.float64)
    if layout.startswith("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    x = x[1:2] if layout.endswith("sliced") else x[:1]
    assert (x.storage_offset() > 0) == layout.endswith("sliced")
    ref = per_sample_reference(layer, x)
    with torch.no_grad():  # the convolution's own layout for this input
        like = dyconv.functional.conv(x, layer.weight[0], None, [1] * rank, [0] * rank, [1] * rank, 1)
    out, products, convs = _counting_products(layer, x)
    assert len(products) == 1 and not convs
    assert out.shape == like.shape and out.stride() == like.stride()
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    out.add_(1.0)  # a plain tensor, not a view that refuses in-place updates
    torch.testing.assert_close(out, ref + 1.0, **TOL[torch.float64])


@pytest.mark.parametrize("case", ["stride2", "padded", "groups2", "channels_last_3d", "channels_innermost_1d",
                                  "expansion_few_positions"])
def test_one_sample_1x1_convolves_where_no_product_applies(case, monkeypatch, one_sample_route):
    """1x1 layers that are strided, padded or grouped, inputs laid out otherwise than contiguous or channels_last
    2-D, and expansions with at most ``POINTWISE_CONV_MAX_POSITIONS`` output positions take the convolution at
    batch 1 (and match the reference)."""
    rank = {"channels_last_3d": 3, "channels_innermost_1d": 1}.get(case, 2)
    kwargs = dict(stride=2) if case == "stride2" else dict(padding=1) if case == "padded" else {}
    channels = (4, 6) if case == "expansion_few_positions" else (6, 4)
    layer = make(rank, 3, True, in_channels=channels[0], out_channels=channels[1], kernel_size=1,
                 groups=2 if case == "groups2" else 1, **kwargs).eval()
    x = make_input(rank, layer, 1)
    if case == "expansion_few_positions":
        x = torch.randn(1, 4, 14, 14, dtype=torch.float64)  # POINTWISE_CONV_MAX_POSITIONS (196) positions
        assert x[0, 0].numel() == dyconv._one_sample.POINTWISE_CONV_MAX_POSITIONS
    if case == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif case == "channels_innermost_1d":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    ref = per_sample_reference(layer, x)
    out, products, convs = _counting_products(layer, x)
    assert not products and len(convs) == 1
    torch.testing.assert_close(out, ref, **TOL[torch.float64])


def _one_sample_plans():
    return getattr(dyconv._chunked.thread_state(), "one_sample_plans", {})


def _batch1_checked():
    """A float64 layer, its one-sample input, and a check of batch-1 inference against the reference."""
    layer = DynamicConv2d(6, 8, 3, padding=1, num_experts=3, temperature=2.0, dtype=torch.float64).eval()
    inputs = [torch.randn(1, 6, 7, 5, dtype=torch.float64)]

    def check():
        x = inputs[0]
        with torch.no_grad():
            out = layer(x)
        torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])

    return layer, inputs, check


def test_one_sample_dense_rule_remembered_per_shape(monkeypatch):
    """The batch-1 path evaluates the dense kernel's rule once per input shape, convolution arguments and
    ``DENSE_MAX_POSITIONS``, and again when one of them changes: each answer right (the dense kernel where the
    output is small, not where it is large or the limit is lowered) and the output exact every time."""
    if not dyconv._cpu_kernel.available():
        pytest.skip("the compiled CPU kernel is not available here")
    layer = DynamicConv2d(5, 6, 3, padding=1, num_experts=3, dtype=torch.float64).eval()
    rules, dense = [], []
    monkeypatch.setattr(dyconv.functional, "_dense_kernel_suits", _spy(dyconv.functional._dense_kernel_suits, rules))
    small, large = torch.randn(1, 5, 6, 7, dtype=torch.float64), torch.randn(1, 5, 15, 14, dtype=torch.float64)
    assert 42 <= dyconv._cpu_kernel.DENSE_MAX_POSITIONS < 210

    def run(x):
        with torch.no_grad():
            out, ops = top_level_ops(lambda: layer(x))
        dense.extend(op for op in ops if op == "dyconv_cpu::dense_forward")
        torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])

    for x, n_rules, n_dense in ((small, 1, 1), (small, 1, 2), (large, 2, 2), (large, 2, 2), (small, 3, 3)):
        run(x)
        assert (len(rules), len(dense)) == (n_rules, n_dense)
    layer.padding = (2, 2)  # another convolution argument: asked again (and the output one larger each side)
    layer._conv_padding = (2, 2)
    run(small)
    assert (len(rules), len(dense)) == (4, 4)
    monkeypatch.setattr(dyconv._cpu_kernel, "DENSE_MAX_POSITIONS", 10)  # a lower limit: asked again, no dense
    run(small)
    assert (len(rules), len(dense)) == (5, 4)


def test_one_sample_views_reused_and_rebuilt_when_parameters_change(one_sample_route):
    """The batch-1 path reuses its views (experts, workspace viewed as the kernel) between calls, sees in-place
    parameter updates through them, and rebuilds them when a parameter, its layout or the workspace is replaced."""
    layer, inputs, checked = _batch1_checked()

    def check():
        checked()
        return _one_sample_plans()[layer]

    plan = check()
    assert plan.compiled == (one_sample_route != "operators")
    assert check() is plan  # reused
    workspace = dyconv._chunked.workspace_base(1, layer.weight)
    assert plan.kernel.untyped_storage().data_ptr() == workspace.untyped_storage().data_ptr()
    with torch.no_grad():  # in place (an optimizer step): the same views see it
        layer.weight.mul_(-2.0)
        layer.bias.add_(1.0)
    assert check() is plan
    layer.weight.data = torch.randn_like(layer.weight)  # replaced storage
    assert check() is not plan
    plan = check()
    layer.load_state_dict(DynamicConv2d(6, 8, 3, padding=1, num_experts=3, dtype=torch.float64).state_dict())
    plan = check()  # copied in place; the temperature's reciprocal is read again
    dyconv.set_temperature(layer, 5.0)
    assert check() is not plan
    plan = check()
    layer.to(memory_format=torch.channels_last)  # replaced, new strides
    inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    assert check() is not plan
    plan = check()
    dyconv._chunked.workspace(10**6, layer.weight)  # a larger request replaces the workspace
    assert check() is not plan
    dyconv._chunked.clear_workspaces()
    assert layer not in _one_sample_plans()
    check()
    assert dyconv._chunked.workspace_bytes() > 0
    copy.deepcopy(layer)  # the views live outside the module
    pickle.loads(pickle.dumps(layer))


def test_one_sample_native_plan_runs_later_calls_alone(monkeypatch):
    """With the compiled kernel, a layer's batch-1 calls after the first are one native call
    (``csrc/one_sample.cpp``), without the Python plan's lookup and checks (``_one_sample._plan``), and exact; a
    change the plan must see sends the next call back through Python, which builds a new plan."""
    if not dyconv._cpu_kernel.available():
        pytest.skip("the compiled CPU kernel is not available here")
    layer, inputs, check = _batch1_checked()
    planned = []
    monkeypatch.setattr(dyconv._one_sample, "_plan", _spy(dyconv._one_sample._plan, planned))
    for _ in range(3):
        check()
    assert len(planned) == 1 and _one_sample_plans()[layer].native is not None
    dyconv.set_temperature(layer, 3.0)
    check()
    check()
    assert len(planned) == 2
    layer.bias = nn.Parameter(layer.bias.detach() + 1.0)
    check()
    check()
    assert len(planned) == 3


def test_one_sample_native_plan_declines_where_python_would(monkeypatch):
    """Once a layer's native plan exists, batch-1 calls under autocast or a Python dispatch mode, or with input of
    another dtype, still take the general path, as before the plan existed: autocast's dtype out, the convolution's
    FLOPs counted by ``FlopCounterMode``, the general path's error for the dtype."""
    from torch.utils.flop_counter import FlopCounterMode

    if not dyconv._cpu_kernel.available():
        pytest.skip("the compiled CPU kernel is not available here")
    layer = DynamicConv2d(8, 16, 3, padding=1).eval()
    x = torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        layer(x)
        assert _one_sample_plans()[layer].native is not None
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        with FlopCounterMode(display=False) as counter:
            layer(x)
        assert counter.get_total_flops() >= 2 * 9 * 8 * 16 * 100  # the convolution's
        with pytest.raises(RuntimeError) as expected:  # a copy has no plan
            copy.deepcopy(layer)(x.double())
        with pytest.raises(RuntimeError) as got:
            layer(x.double())
        assert str(got.value) == str(expected.value)
        torch.testing.assert_close(layer(x), per_sample_reference(layer.double(), x.double()).float(),
                                   **TOL[torch.float32])


def _plan_changes():
    """Changes after which a layer's batch-1 plan no longer holds, each as a function of the layer."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    def replace(module, name, value):
        setattr(module, name, value)

    def with_fresh(name):
        return lambda layer: replace(layer, name, nn.Parameter(getattr(layer, name).detach().clone()))

    return {
        "weight replaced": with_fresh("weight"),
        "bias replaced": with_fresh("bias"),
        "bias removed": lambda layer: replace(layer, "bias", None),
        "weight storage": lambda layer: setattr(layer.weight, "data", layer.weight.detach().clone()),
        "weight strides": lambda layer: layer.to(memory_format=torch.channels_last),
        # the same memory and shape, other strides (the kernel's two 3-wide dims swapped)
        "weight transposed": lambda layer: setattr(layer.weight, "data", layer.weight.detach().transpose(3, 4)),
        "bias storage": lambda layer: setattr(layer.bias, "data", layer.bias.detach() + 1.0),
        "temperature in place": lambda layer: layer.temperature.fill_(3.0),
        "temperature storage": lambda layer: setattr(layer.temperature, "data", layer.temperature * 3.0),
        "temperature replaced": lambda layer: layer.register_buffer("temperature", layer.temperature.clone()),
        "router replaced": lambda layer: replace(layer, "router", copy.deepcopy(layer.router)),
        "fc1 replaced": lambda layer: replace(layer.router, "fc1", copy.deepcopy(layer.router.fc1)),
        "fc2 weight": lambda layer: replace(layer.router.fc2, "weight", nn.Parameter(layer.router.fc2.weight + 0)),
        "fc1 bias": lambda layer: replace(layer.router.fc1, "bias", nn.Parameter(layer.router.fc1.bias + 0)),
        "forward hook": lambda layer: layer.router.register_forward_hook(lambda *args: None),
        "pre-hook": lambda layer: layer.router.register_forward_pre_hook(lambda *args: None),
        "parametrized": lambda layer: parametrize.register_parametrization(layer, "weight", Doubled()),
        "workspace replaced": lambda layer: dyconv._chunked.workspace(10**6, layer.weight),
        "dense limit": lambda layer: setattr(dyconv._cpu_kernel, "DENSE_MAX_POSITIONS", 7),
        "pointwise limit": lambda layer: setattr(dyconv._one_sample, "POINTWISE_CONV_MAX_POSITIONS", 7),
    }


@pytest.mark.parametrize("change", list(_plan_changes()))
def test_one_sample_plan_checks_agree(change, monkeypatch):
    """The Python plan's check (``_Plan.matches``) and the native plan's (``OneSamplePlan.matches``) agree: both
    hold for an unchanged layer and an in-place update of its parameters, and both fail after each change the plan
    must see; the next call is exact."""
    if not dyconv._cpu_kernel.available():
        pytest.skip("the compiled CPU kernel is not available here")
    for name in ("DENSE_MAX_POSITIONS", "POINTWISE_CONV_MAX_POSITIONS"):  # restored after the test
        module = dyconv._cpu_kernel if name.startswith("DENSE") else dyconv._one_sample
        monkeypatch.setattr(module, name, getattr(module, name))
    layer, _, check = _batch1_checked()
    check()
    plan = _one_sample_plans()[layer]
    with torch.no_grad():
        layer.weight.mul_(0.5)
    assert plan.matches(layer.weight) and plan.native.matches()
    _plan_changes()[change](layer)
    weight = layer._parameters.get("weight")
    assert not (weight is not None and plan.matches(weight))
    assert not plan.native.matches()
    check()


def test_one_sample_path_respects_hooks_parametrizations_and_pruning(one_sample_route):
    """Where the layer's members are not plain (hooks on the attention, a parametrized or pruned weight), batch-1
    inference still equals the reference and still calls the hooks."""
    from torch.nn.utils import parametrize, prune

    layer, _, check = _batch1_checked()
    check()  # the lean path's views exist now; hooks added later must still run
    for register in (layer.router.register_forward_hook, layer.router.register_forward_pre_hook):
        calls = []
        handle = register(lambda *args: calls.append(1))
        check()
        assert calls, register.__name__
        handle.remove()

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(layer, "weight", Doubled())
    check()
    parametrize.remove_parametrizations(layer, "weight")
    check()
    prune.random_unstructured(layer.router.fc2, "weight", amount=0.5)
    check()
    prune.remove(layer.router.fc2, "weight")
    check()


def test_one_sample_path_for_a_layer_built_in_inference_mode(one_sample_route):
    """Parameters and buffers made under torch.inference_mode are inference tensors (no version counter): the
    batch-1 path still follows a temperature changed in place, inside and outside inference mode."""
    with torch.inference_mode():
        layer = DynamicConv2d(4, 6, 3, padding=1, num_experts=3, dtype=torch.float64).eval()
        x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(layer(x), per_sample_reference(layer, x), **TOL[torch.float64])
        before = layer(x)
        dyconv.set_temperature(layer, 0.5)
        torch.testing.assert_close(layer(x), per_sample_reference(layer, x), **TOL[torch.float64])
        assert not torch.allclose(layer(x), before)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), per_sample_reference(layer, x), **TOL[torch.float64])


def test_one_sample_path_in_several_threads(one_sample_route):
    """Each thread mixes into its own workspace: the same layer at batch 1 in two threads at once stays exact."""
    import threading

    layer = DynamicConv2d(16, 32, 3, padding=1, num_experts=4, temperature=2.0, dtype=torch.float64).eval()
    inputs = [torch.randn(1, 16, 9, 9, dtype=torch.float64) for _ in range(2)]
    refs = [per_sample_reference(layer, x) for x in inputs]
    errors = []

    def work(i):
        try:
            for _ in range(50):
                with torch.no_grad():
                    torch.testing.assert_close(layer(inputs[i]), refs[i], **TOL[torch.float64])
        except Exception as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _spy(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped
