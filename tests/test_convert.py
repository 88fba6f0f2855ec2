"""dyconv.convert / convert_report / average_experts on models no one here wrote, and on hand-made ones."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import dyconv
from dyconv import DynamicConv1d, DynamicConv2d, DynamicConv3d
from dyconv.convert import DynamicConv2dSame, tf_same_padding

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

STATIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DYNAMIC = (DynamicConv1d, DynamicConv2d, DynamicConv3d)
RTOL = 1e-5  # relative to the largest output magnitude


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


class Conv1dNet(nn.Module):
    """A hand-made 1-D CNN: strided, dilated, 'same' (odd and even kernels), grouped, depthwise, reflect, no bias."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 8, 5, stride=2, padding=2)
        self.dilated = nn.Conv1d(8, 8, 3, padding="same", dilation=2)
        self.even_same = nn.Conv1d(8, 8, 4, padding="same", bias=False)
        self.grouped = nn.Conv1d(8, 12, 3, padding=1, groups=4)
        self.depthwise = nn.Conv1d(12, 12, 3, stride=2, padding=1, groups=12, padding_mode="reflect")
        self.valid = nn.Conv1d(12, 6, 2, padding="valid", padding_mode="circular")
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for conv in (self.stem, self.dilated, self.even_same, self.grouped, self.depthwise, self.valid):
            x = torch.relu(conv(x))
        return self.head(self.bn(x).mean(-1))


# (id, builder, input shape, number of convolutions that must become dynamic: all but the stem). The counts come
# from the architectures, e.g. ResNet-18 has 20 convolutions (stem, 16 in the blocks, 3 downsample projections),
# MobileNetV2 has 52 (stem, 2 in the first block, 3 in each of the other 16, the final 1x1).
MODELS = {
    "tv_resnet18": (lambda: torchvision.models.resnet18(weights=None), (2, 3, 32, 32), 19),
    # depthwise 3x3 (stride 1 and 2) between 1x1 convolutions
    "tv_shufflenet_v2": (lambda: torchvision.models.shufflenet_v2_x0_5(weights=None), (2, 3, 32, 32), 55),
    # 3-D; its convolutions are Conv3DSimple, an nn.Conv3d subclass that keeps nn.Conv3d's forward
    "tv_r3d_18": (lambda: torchvision.models.video.r3d_18(weights=None), (2, 3, 4, 16, 16), 19, 2),
    # tf_ models use timm's Conv2dSame (TF "SAME" padding from the input size) for strided convs: odd sizes on
    # purpose, so that the padding is asymmetric. 53 convolutions: stem, 2 in the first block, 3 in each of the 10
    # others, 2 in each of the 9 squeeze-excitation modules, the last 1x1 block, the head's 1x1
    "timm_tf_mobilenetv3_small": (lambda: timm.create_model("tf_mobilenetv3_small_100", pretrained=False),
                                  (2, 3, 35, 33), 52),
    "timm_resnet18_dilated": (lambda: timm.create_model("resnet18", pretrained=False, output_stride=8),
                              (2, 3, 32, 32), 19),
    "conv1d_net": (Conv1dNet, (2, 2, 37), 5),
    # slow ones
    "tv_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), (2, 3, 32, 32), 51),
    # 52 convolutions incl. the 2 of each of the 9 squeeze-excitation modules (1x1 convs on pooled features)
    "tv_mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None), (2, 3, 32, 32), 51),
    "tv_efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(weights=None), (2, 3, 32, 32), 80),
    # grouped (not depthwise) 3x3 convolutions
    "tv_regnet_x_400mf": (lambda: torchvision.models.regnet_x_400mf(weights=None), (2, 3, 32, 32), 70),
    "timm_regnetx_002": (lambda: timm.create_model("regnetx_002", pretrained=False), (2, 3, 32, 32), 43),
    "timm_mobilenetv3_small_050": (lambda: timm.create_model("mobilenetv3_small_050", pretrained=False),
                                   (2, 3, 32, 32), 52),
    "timm_tf_efficientnet_b0": (lambda: timm.create_model("tf_efficientnet_b0", pretrained=False),
                                (2, 3, 35, 33), 80),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", pretrained=False), (2, 3, 32, 32), 80),
}
FAST = ["tv_resnet18", "tv_shufflenet_v2", "tv_r3d_18", "timm_tf_mobilenetv3_small", "timm_resnet18_dilated",
        "conv1d_net"]
# r3d_18 is converted with K = 2 (the default K = 4 makes 133M parameters); exactness does not depend on K
PARAMS = [pytest.param(name, *spec[:3], spec[3] if len(spec) > 3 else 4, id=name,
                       marks=() if name in FAST else pytest.mark.slow) for name, spec in MODELS.items()]


@pytest.mark.parametrize("name,build,shape,num_dynamic,num_experts", PARAMS)
def test_copy_conversion_is_exact(name, build, shape, num_dynamic, num_experts):
    model = build().eval()
    before = snapshot(model)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)

    dy, report = dyconv.convert(model, num_experts=num_experts, return_report=True)

    # the original is untouched
    assert same_state(model, before)
    assert not any(isinstance(m, DYNAMIC) for m in model.modules())
    # the right layers: all but the stem, under the same names, with the same conv arguments
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, STATIC)]
    dy_modules = dict(dy.named_modules())
    assert len(report.converted) == num_dynamic == len(convs) - 1
    assert sum(isinstance(m, DYNAMIC) for m in dy.modules()) == num_dynamic
    stem_name, stem = convs[0]
    assert list(report.skipped) == [stem_name]
    assert dy_modules[stem_name] is not stem and type(dy_modules[stem_name]) is type(stem)
    for conv_name, conv in convs[1:]:
        layer = dy_modules[conv_name]
        assert isinstance(layer, DYNAMIC[conv.weight.dim() - 3])
        assert layer.weight.shape == (num_experts, *conv.weight.shape)
        assert (layer.groups, tuple(layer.dilation), layer.padding_mode) == (conv.groups, conv.dilation,
                                                                            conv.padding_mode)
        assert (layer.bias is None) == (conv.bias is None)
        assert not layer.training
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert report.params_after == sum(p.numel() for p in dy.parameters())
    assert dyconv.convert_report(model, num_experts=num_experts) == report

    # eval: the same outputs
    with torch.no_grad():
        assert rel_err(dy(x), expected) < RTOL
        # attention off (mean of identical experts) gives the original back as well
        static = dyconv.average_experts(dy)
        assert not any(isinstance(m, DYNAMIC) for m in static.modules())
        assert rel_err(static(x), expected) < RTOL

    # train mode works and every parameter gets a gradient
    dy.train()
    dy(x).square().mean().backward()
    missing = [n for n, p in dy.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("name", ["conv1d_net", "tv_shufflenet_v2",
                                  pytest.param("timm_tf_mobilenetv3_small", marks=pytest.mark.slow),
                                  pytest.param("timm_resnet18_dilated", marks=pytest.mark.slow)])
def test_copy_conversion_is_exact_in_train_mode(name):
    build, shape = MODELS[name][:2]
    # float64: the batch statistics of a batch of 2 at 1x1 resolution amplify float32 rounding a thousandfold
    model = build().double().train()
    dy = dyconv.convert(model)
    x = torch.randn(shape, dtype=torch.float64)
    torch.manual_seed(1)  # the same dropout masks: the dynamic layers draw no random numbers
    with torch.no_grad():
        expected = model(x)
    torch.manual_seed(1)
    with torch.no_grad():
        assert rel_err(dy(x), expected) < RTOL
    assert all(m.training for m in dy.modules())


def test_tf_same_padding_matches_tensorflow_rule():
    # TF: out = ceil(n / s); total pad = max((out - 1) * s + (k - 1) * d + 1 - n, 0), odd element after
    assert tf_same_padding(7, 3, 2, 1) == (1, 1)  # out 4: 3*2 + 3 - 7 = 2
    assert tf_same_padding(8, 3, 2, 1) == (0, 1)  # out 4: 3*2 + 3 - 8 = 1
    assert tf_same_padding(8, 1, 2, 1) == (0, 0)
    assert tf_same_padding(5, 3, 1, 2) == (2, 2)  # stride 1: (k - 1) * d
    assert tf_same_padding(6, 4, 1, 1) == (1, 2)


@pytest.mark.parametrize("size", [(9, 8), (10, 7), (1, 2)])
def test_dynamic_conv2d_same_matches_timm_conv2d_same(size):
    from timm.layers import Conv2dSame

    conv = Conv2dSame(4, 6, (3, 4), stride=(2, 3), dilation=(1, 2)).double()
    layer = dyconv.convert(nn.Sequential(conv), convert_stem=True)[0]
    assert type(layer) is DynamicConv2dSame
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x))
    torch.testing.assert_close(layer(x[0]), conv(x[0]))  # unbatched
    torch.testing.assert_close(torch.jit.script(layer)(x), conv(x))
    back = dyconv.average_experts(nn.Sequential(layer))[0]
    assert type(back) is Conv2dSame
    torch.testing.assert_close(back(x), conv(x))


class Custom(nn.Module):
    """Convolution subclasses with their own forward, a transposed conv, hooks and parametrizations."""

    def __init__(self):
        super().__init__()
        from timm.layers import ScaledStdConv2d, StdConv2d
        from timm.layers.conv2d_same import Conv2dSameExport

        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.std = StdConv2d(8, 8, 3, padding=1)
        self.scaled_std = ScaledStdConv2d(8, 8, 3, padding=1)
        self.same_export = Conv2dSameExport(8, 8, 3, stride=2)
        self.hooked = nn.Conv2d(8, 8, 1)
        self.hooked.register_forward_hook(lambda module, inputs, output: output * 2)
        self.normed = parametrizations.weight_norm(nn.Conv2d(8, 8, 1))
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.plain = nn.Conv2d(8, 4, (3, 2), padding="same", dilation=(2, 1))  # PyTorch "same", asymmetric

    def forward(self, x):
        x = self.stem(x)
        for layer in (self.std, self.scaled_std, self.same_export, self.hooked, self.normed, self.up, self.plain):
            x = layer(x)
        return x


def test_convolutions_that_compute_differently_stay_static_and_are_reported():
    model = Custom().eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = model(x)
    dy, report = dyconv.convert(model, return_report=True)
    assert report.converted == ["plain"]
    assert set(report.skipped) == {"stem", "std", "scaled_std", "same_export", "hooked", "normed", "up"}
    assert "StdConv2d overrides Conv2d's forward" in report.skipped["std"]
    assert "ScaledStdConv2d overrides" in report.skipped["scaled_std"]
    assert "Conv2dSameExport overrides" in report.skipped["same_export"]
    assert "hooks" in report.skipped["hooked"]
    assert "parametrized" in report.skipped["normed"]
    assert "transposed" in report.skipped["up"]
    for name in report.skipped:
        assert type(getattr(dy, name)) is type(getattr(model, name))
    with torch.no_grad():
        assert rel_err(dy(x), expected) < RTOL


def test_lazy_convolution_is_skipped_until_initialised():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyConv2d(5, 3))
    _, report = dyconv.convert(model, return_report=True)
    assert report.converted == [] and "lazy" in report.skipped["1"]
    model(torch.randn(1, 3, 6, 6))  # materialises the lazy conv into an nn.Conv2d
    _, report = dyconv.convert(model, return_report=True)
    assert report.converted == ["1"]


def resnet():
    return torchvision.models.resnet18(weights=None, num_classes=10)


def dynamic_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, DYNAMIC)}


ALL_BUT_STEM = {n for n, m in resnet().named_modules() if isinstance(m, nn.Conv2d)} - {"conv1"}


@pytest.mark.parametrize("exclude,expected", [
    ("layer4", ALL_BUT_STEM - {n for n in ALL_BUT_STEM if n.startswith("layer4.")}),
    (["layer1.0.conv1", "layer2.0.downsample.0"], ALL_BUT_STEM - {"layer1.0.conv1", "layer2.0.downsample.0"}),
    ("*.downsample.*", ALL_BUT_STEM - {"layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"}),
    (lambda name, m: m.kernel_size == (1, 1), ALL_BUT_STEM - {"layer2.0.downsample.0", "layer3.0.downsample.0",
                                                              "layer4.0.downsample.0"}),
    ((), ALL_BUT_STEM),
])
def test_exclude(exclude, expected):
    model = resnet()
    dy, report = dyconv.convert(model, exclude=exclude, return_report=True)
    assert dynamic_names(dy) == expected
    assert set(report.converted) == expected
    assert all(report.skipped[n] == "selected by exclude" for n in ALL_BUT_STEM - expected)


@pytest.mark.parametrize("include,expected", [
    ("layer3.1", {"layer3.1.conv1", "layer3.1.conv2"}),
    ("layer[34].*.conv2", {"layer3.0.conv2", "layer3.1.conv2", "layer4.0.conv2", "layer4.1.conv2"}),
    (lambda name, m: m.stride == (2, 2) and m.kernel_size == (3, 3), {"layer2.0.conv1", "layer3.0.conv1",
                                                                      "layer4.0.conv1"}),
    ("conv1", set()),  # the stem stays static unless convert_stem=True
])
def test_include(include, expected):
    dy, report = dyconv.convert(resnet(), include=include, return_report=True)
    assert dynamic_names(dy) == expected
    assert report.skipped["conv1"].startswith("stem")


def test_include_and_exclude_combine_and_stem_can_be_converted():
    dy = dyconv.convert(resnet(), include="layer1", exclude="*.conv2", convert_stem=True)
    assert dynamic_names(dy) == {"layer1.0.conv1", "layer1.1.conv1"}
    dy = dyconv.convert(resnet(), convert_stem=True)
    assert dynamic_names(dy) == ALL_BUT_STEM | {"conv1"}


def test_selector_errors():
    with pytest.raises(ValueError, match="'layer5'"):
        dyconv.convert(resnet(), exclude=["layer4", "layer5"])
    with pytest.raises(TypeError, match="include=3"):
        dyconv.convert(resnet(), include=3)
    with pytest.raises(TypeError, match="exclude="):
        dyconv.convert(resnet(), exclude=["layer1", 2])
    with pytest.raises(ValueError, match="init='random'"):
        dyconv.convert(resnet(), init="random")
    with pytest.raises(ValueError, match="noise_std=-0.1"):
        dyconv.convert(resnet(), noise_std=-0.1)
    with pytest.raises(ValueError, match="noise_std"):
        dyconv.convert(resnet(), init="fresh", noise_std=0.1)
    with pytest.raises(ValueError, match="num_experts=0"):
        dyconv.convert(resnet(), num_experts=0)


def test_options_reach_the_layers_and_report_counts_match():
    model = resnet()
    dy, report = dyconv.convert(model, num_experts=3, reduction=8, temperature=5.0, return_report=True)
    layers = [m for m in dy.modules() if isinstance(m, DYNAMIC)]
    assert all(m.num_experts == 3 and m.reduction == 8 and float(m.temperature) == 5.0 for m in layers)
    assert dyconv.get_temperature(dy) == 5.0
    # hand count for one layer: layer1.0.conv1 is 64->64 3x3 without bias; hidden = 64 // 8 = 8
    layer = dy.layer1[0].conv1
    assert sum(p.numel() for p in layer.parameters()) == 3 * 64 * 64 * 9 + (64 * 8 + 8) + (8 * 3 + 3)
    assert report.params_after == sum(p.numel() for p in dy.parameters())
    assert dyconv.convert_report(model, num_experts=3, reduction=8).params_after == report.params_after


def test_inplace_device_dtype_frozen_and_shared():
    shared = nn.Conv1d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv1d(2, 4, 1), shared, nn.ReLU(), shared).double().train()
    model[0].weight.requires_grad_(False)
    shared.weight.requires_grad_(False)
    out = dyconv.convert(model, inplace=True)
    assert out is model
    layer = model[1]
    assert isinstance(layer, DynamicConv1d) and model[3] is layer  # a shared conv stays one shared layer
    assert layer.weight.dtype == torch.float64 and layer.temperature.dtype == torch.float64
    assert layer.training
    assert not layer.weight.requires_grad and layer.bias.requires_grad and layer.router.fc1.weight.requires_grad


def test_fresh_init_gives_independent_experts():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    layer = dyconv.convert(model, init="fresh")[1]
    w = layer.weight
    assert not torch.equal(w[0], model[1].weight)
    assert not torch.equal(w[0], w[1])
    # each expert has nn.Conv2d's init scale: uniform(-b, b) with b = 1 / sqrt(fan_in)
    bound = 1 / math.sqrt(8 * 9)
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_noise_breaks_symmetry_and_keeps_the_mean():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    layer = dyconv.convert(model, noise_std=0.01)[1]
    original = model[1].weight
    assert not torch.equal(layer.weight[0], layer.weight[1])
    spread = (layer.weight - original).std() / original.std()
    assert 0.005 < spread < 0.02
    torch.testing.assert_close(layer.weight.mean(0), original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.bias, model[1].bias.expand(4, -1))


def test_router_gradient_is_zero_at_exact_copy_and_not_after_one_step():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).double()
    dy = dyconv.convert(model, temperature=1.0)
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    target = torch.randn(4, 8, 8, 8, dtype=torch.float64)
    optimizer = torch.optim.SGD(dy.parameters(), lr=0.5)
    router = dy[2].router.fc2.weight
    grads = []
    for _ in range(2):
        optimizer.zero_grad()
        (dy(x) - target).square().mean().backward()
        grads.append(router.grad.abs().max().item())
        optimizer.step()
    # identical experts: every expert's output is the same, and the attention sums to one
    assert grads[0] < 1e-12
    # the experts' gradients are weighted by different attention values, so they differ after one step
    assert grads[1] > 1e-6
    noisy = dyconv.convert(model, temperature=1.0, noise_std=0.01)
    (noisy(x) - target).square().mean().backward()
    assert noisy[2].router.fc2.weight.grad.abs().max() > 1e-6


def test_average_experts_is_the_mean_and_keeps_arguments():
    layer = DynamicConv3d(4, 6, (1, 3, 2), stride=(1, 2, 1), padding="valid", dilation=(1, 1, 2), groups=2,
                          padding_mode="zeros", num_experts=3)
    model = nn.Sequential(layer).eval()
    conv = dyconv.average_experts(model)[0]
    assert type(conv) is nn.Conv3d and model[0] is layer
    assert (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) == (
        (1, 3, 2), (1, 2, 1), "valid", (1, 1, 2), 2)
    torch.testing.assert_close(conv.weight, (layer.weight[0] + layer.weight[1] + layer.weight[2]) / 3)
    torch.testing.assert_close(conv.bias, layer.bias.mean(0))
    assert not conv.training
    # a uniform attention (infinite temperature) computes exactly the averaged kernel
    x = torch.randn(2, 4, 3, 9, 8)
    dyconv.set_temperature(model, 1e30)
    torch.testing.assert_close(model(x), conv(x), rtol=1e-5, atol=1e-6)


# The registry's documented placement (dyconv/models/*.py docstrings): ResNets and the 1-D CNN: every conv but the
# stem; MobileNetV2: the final 1x1 (320 -> 1280) stays static too; MobileNetV3: the squeeze-excitation 1x1s too.
TWIN_EXCLUDE = {"resnet": None, "cnn1d": None, "mobilenetv2": "features.18", "mobilenetv3": "*.fc[12]"}
FAST_TWINS = ("cnn1d", "resnet10", "mobilenetv2_050", "mobilenetv3_small_100")


def static_registry_models():
    return [pytest.param(n, id=n, marks=() if n in FAST_TWINS else pytest.mark.slow)
            for n in dyconv.list_models() if not dyconv.model_info(n).dynamic]


@pytest.mark.parametrize("name", static_registry_models())
def test_converting_a_static_twin_gives_the_registry_dy_twin(name):
    info = dyconv.model_info(name)
    exclude = next(v for family, v in TWIN_EXCLUDE.items() if name.startswith(family))
    options = dict(in_channels=info.input_size[1], num_classes=info.num_classes)
    converted = dyconv.convert(dyconv.create_model(name, **options), exclude=exclude, num_experts=3, reduction=8)
    twin = dyconv.create_model(info.twin, **options, num_experts=3, reduction=8)
    types = {n: type(m) for n, m in converted.named_modules() if isinstance(m, (*STATIC, *DYNAMIC))}
    assert types == {n: type(m) for n, m in twin.named_modules() if isinstance(m, (*STATIC, *DYNAMIC))}
    assert any(t in DYNAMIC for t in types.values())
    # same parameters and buffers, name by name and shape by shape: a DY twin's checkpoint loads into it
    assert {k: v.shape for k, v in converted.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in twin.parameters())
    converted.load_state_dict(twin.state_dict())
    # and then computes what the twin computes
    shape = info.input_size if len(info.input_size) != 4 else (2, 3, 32, 32)
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        assert rel_err(converted.eval()(x), twin.eval()(x)) < RTOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_conversion_keeps_the_device():
    model = Conv1dNet().cuda().eval()
    x = torch.randn(2, 2, 37, device="cuda")
    dy = dyconv.convert(model)
    assert all(p.is_cuda for p in dy.parameters()) and all(b.is_cuda for b in dy.buffers())
    with torch.no_grad():
        assert rel_err(dy(x), model(x)) < RTOL


def test_report_text_and_dry_run_leave_the_model_alone():
    model = Conv1dNet()
    before = snapshot(model)
    report = dyconv.convert_report(model, exclude="grouped")
    assert same_state(model, before) and not any(isinstance(m, DYNAMIC) for m in model.modules())
    assert report.converted == ["dilated", "even_same", "depthwise", "valid"]
    assert report.skipped == {"stem": report.skipped["stem"], "grouped": "selected by exclude"}
    text = str(report)
    assert text.startswith("converted 4 convolution(s), skipped 2; parameters ")
    assert "  skipped    grouped: selected by exclude" in text.splitlines()
