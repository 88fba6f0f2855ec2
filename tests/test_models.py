"""The model registry, parametrised over every registered model (timm/torchvision style).

The default run checks every model where that is cheap (registry, structure, sizes) and the smallest model
of each family where it needs forward/backward passes; ``--runslow`` (CI) runs those for every model too.
"""

import pytest
import torch
from torch import nn

import dyconv
from dyconv.layers import DYNAMIC_CONV_TYPES

EXPECTED_NAMES = [
    *[f"{prefix}mobilenetv2_{w}" for prefix in ("", "dy_") for w in ("100", "075", "050", "035")],
    *[f"{prefix}mobilenetv3_{size}_100" for prefix in ("", "dy_") for size in ("small", "large")],
    *[f"{prefix}resnet{depth}" for prefix in ("", "dy_") for depth in (10, 18, 34, 50)],
    "cnn1d",
    "dy_cnn1d",
]
ALL = dyconv.list_models()
ONE_D = [n for n in ALL if "cnn1d" in n]
TWO_D = [n for n in ALL if n not in ONE_D]
DYNAMIC = [n for n in ALL if dyconv.model_info(n).dynamic]
# The smallest model of each family and its twin: forward/backward checks on these by default, on all with --runslow.
FAST = {"mobilenetv2_035", "dy_mobilenetv2_035", "mobilenetv3_small_100", "dy_mobilenetv3_small_100", "resnet10",
        "dy_resnet10", "cnn1d", "dy_cnn1d"}
# Models whose construction alone (K × 20M+ kernels initialised) takes seconds.
HEAVY = {"dy_resnet34", "dy_resnet50", "dy_mobilenetv3_large_100"}
AT_224 = ["mobilenetv2_035", "dy_mobilenetv2_035", "mobilenetv3_small_100", "dy_mobilenetv3_small_100",
          "resnet10", "dy_resnet10"]


def _slow_unless(names, keep):
    return [n if n in keep else pytest.param(n, marks=pytest.mark.slow) for n in names]


def _reference_model(name):
    info = dyconv.model_info(name)
    return dyconv.create_model(name, num_classes=info.num_classes, in_channels=info.input_size[1])


def _reference_profile(name):
    return dyconv.profile(_reference_model(name), dyconv.model_info(name).input_size)


# ---------------------------------------------------------------- registry


def test_registry_has_the_papers_pairs():
    assert sorted(EXPECTED_NAMES) == ALL


def test_list_models_pattern():
    assert dyconv.list_models("dy_resnet*") == ["dy_resnet10", "dy_resnet18", "dy_resnet34", "dy_resnet50"]
    assert dyconv.list_models("nothing*") == []
    with pytest.raises(TypeError, match="pattern"):
        dyconv.list_models(3)


@pytest.mark.parametrize("name", ALL)
def test_metadata(name):
    info = dyconv.model_info(name)
    twin = dyconv.model_info(info.twin)
    assert info.dynamic == name.startswith("dy_")
    assert twin.dynamic != info.dynamic and twin.twin == name
    assert info.trained_by is None and info.checkpoint is None  # no checkpoint published yet
    expected = {"num_classes", "in_channels", "small_input"} | ({"num_experts", "reduction", "temperature"}
                                                               if info.dynamic else set())
    assert set(info.options) == expected


def test_unknown_name():
    with pytest.raises(ValueError, match="resnet19"):
        dyconv.create_model("resnet19")


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="width"):
        dyconv.create_model("dy_resnet10", width=2)


def test_dynamic_option_on_static_model_is_named():
    with pytest.raises(TypeError, match="num_experts.*dy_resnet10"):
        dyconv.create_model("resnet10", num_experts=4)


@pytest.mark.parametrize("option", [{"num_experts": 0}, {"reduction": 0}, {"temperature": -1.0}])
def test_bad_dynamic_option_is_named(option):
    (key, value), = option.items()
    with pytest.raises(ValueError, match=f"{key}={value}"):
        dyconv.create_model("dy_cnn1d", **option)


def test_cnn1d_refuses_small_input():
    with pytest.raises(ValueError, match="small_input=True"):
        dyconv.create_model("cnn1d", small_input=True)


@pytest.mark.parametrize("num_experts", [2, 6])
def test_dynamic_options_reach_the_layers(num_experts):
    model = dyconv.create_model("dy_resnet10", num_experts=num_experts, reduction=8, temperature=5.0)
    layers = [m for m in model.modules() if isinstance(m, DYNAMIC_CONV_TYPES)]
    assert layers and all(m.num_experts == num_experts and m.reduction == 8 for m in layers)
    assert all(float(m.temperature) == 5.0 for m in layers)


# ---------------------------------------------------------------- forward shapes, options


@pytest.mark.parametrize("name", _slow_unless(TWO_D, FAST))
def test_forward_shapes_2d(name):
    small = dyconv.create_model(name, num_classes=10, in_channels=1, small_input=True).eval()
    other = dyconv.create_model(name, num_classes=7, in_channels=5).eval()
    with torch.no_grad():
        assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # Fashion-MNIST size
        assert small(torch.randn(1, 1, 32, 32)).shape == (1, 10)  # CIFAR size
        assert other(torch.randn(2, 5, 57, 64)).shape == (2, 7)
        with pytest.raises((RuntimeError, ValueError)):
            other(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name", AT_224)
def test_forward_shape_224(name):
    model = dyconv.create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("name", ONE_D)
def test_forward_shapes_1d(name):
    model = dyconv.create_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 40)).shape == (3, 10)  # MNIST-1D
        assert model(torch.randn(2, 1, 57)).shape == (2, 10)
    model = dyconv.create_model(name, num_classes=4, in_channels=2).eval()
    assert model(torch.randn(2, 2, 40)).shape == (2, 4)


@pytest.mark.parametrize("name", _slow_unless(TWO_D, FAST))
def test_small_input_removes_two_downsamplings(name):
    # total stride 8 instead of 32: 32×32 → 4×4 before pooling (the classifier input is pooled, so look inside)
    sizes = {}
    for small in (False, True):
        model = dyconv.create_model(name, small_input=small).eval()
        body = model.features if hasattr(model, "features") else nn.Sequential(
            model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4)
        with torch.no_grad():
            sizes[small] = tuple(body(torch.randn(1, 3, 32, 32)).shape[-2:])
    assert sizes == {False: (1, 1), True: (4, 4)}


# ---------------------------------------------------------------- training, determinism


def small_model_and_input(name, batch):
    """``name`` for 10 classes and one input channel (small-image stem for 2-D models), and a random batch:
    ``(batch, 1, 40)`` MNIST-1D-like signals for 1-D models, ``(batch, 1, 28, 28)`` images otherwise."""
    if name in ONE_D:
        return dyconv.create_model(name, num_classes=10, in_channels=1), torch.randn(batch, 1, 40)
    return dyconv.create_model(name, num_classes=10, in_channels=1, small_input=True), torch.randn(batch, 1, 28, 28)


@pytest.mark.parametrize("name", _slow_unless(ALL, FAST))
def test_backward_reaches_every_parameter(name):
    model, x = small_model_and_input(name, 4)
    model.train()
    out = model(x)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", _slow_unless(ALL, FAST))
def test_eval_is_deterministic_and_per_sample(name):
    model, x = small_model_and_input(name, 3)
    model.eval()
    with torch.no_grad():
        first, second, alone = model(x), model(x), model(x[1:2])
    assert torch.equal(first, second)
    # a sample's output does not depend on its batch-mates (no BatchNorm statistics in eval, none in attention)
    torch.testing.assert_close(alone, first[1:2], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- static twin vs dynamic model


def _conv_rank(module):
    return module._rank if isinstance(module, DYNAMIC_CONV_TYPES) else len(module.kernel_size)


def _normalised_tree(model):
    """(name, type) per module, every convolution as 'Conv<rank>d' with its hyper-parameters; attention skipped."""
    dynamic = [n for n, m in model.named_modules() if isinstance(m, DYNAMIC_CONV_TYPES)]
    tree = []
    for n, m in model.named_modules():
        if any(n.startswith(d + ".") for d in dynamic):
            continue
        if isinstance(m, DYNAMIC_CONV_TYPES + (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            tree.append((n, f"Conv{_conv_rank(m)}d", m.in_channels, m.out_channels, tuple(m.kernel_size),
                         tuple(m.stride), tuple(m.padding), tuple(m.dilation), m.groups, m.bias is not None))
        else:
            tree.append((n, type(m).__name__))
    return tree


def _stays_static(name, module_name, model):
    """The convolutions the paper (or our documented choice) keeps static in a DY model."""
    if module_name in ("conv1", "features.0.0"):  # the stems
        return True
    if name.startswith("dy_mobilenetv2") and module_name == f"features.{len(model.features) - 1}.0":
        return True  # the final 1×1 convolution 320 → 1280 (paper)
    if name.startswith("dy_mobilenetv3") and module_name.rsplit(".", 1)[-1] in ("fc1", "fc2"):
        return True  # squeeze-excitation (our choice)
    return False


@pytest.mark.parametrize("name", _slow_unless(DYNAMIC, set(DYNAMIC) - HEAVY))
def test_dynamic_model_is_static_twin_with_other_convs(name):
    _check_structure(name, {})


@pytest.mark.parametrize("name", _slow_unless([n for n in DYNAMIC if n not in ONE_D], FAST))
def test_dynamic_model_is_static_twin_with_small_input(name):
    _check_structure(name, {"small_input": True})


def _check_structure(name, kwargs):
    dy = dyconv.create_model(name, **kwargs)
    static = dyconv.create_model(dyconv.model_info(name).twin, **kwargs)
    assert not any(isinstance(m, DYNAMIC_CONV_TYPES) for m in static.modules())
    assert _normalised_tree(dy) == _normalised_tree(static)
    convs = [(n, m) for n, m in dy.named_modules() if isinstance(m, DYNAMIC_CONV_TYPES + (nn.Conv1d, nn.Conv2d))]
    for n, m in convs:
        assert isinstance(m, DYNAMIC_CONV_TYPES) != _stays_static(name, n, dy), n


# ---------------------------------------------------------------- the paper's table (1×3×224×224, eval)

# name: (params, MAdds, params tolerance, MAdds tolerance), from Chen et al. 2020 (shared/spec §2)
PAPER_TARGETS = {
    "dy_mobilenetv2_100": (11.1e6, 312.9e6, 0.05, 0.05),
    "dy_mobilenetv2_075": (7.0e6, 217.5e6, 0.05, 0.05),
    "dy_mobilenetv2_050": (4.0e6, 101.4e6, 0.05, 0.05),
    "dy_mobilenetv2_035": (2.8e6, 62.0e6, 0.05, 0.05),
    "dy_resnet18": (42.7e6, 1.85e9, 0.10, 0.05),
    "dy_resnet10": (18.6e6, 0.91e9, 0.10, 0.05),
    # the static MobileNetV2s and ResNets' MAdds (their params: torchvision parity below)
    "mobilenetv2_100": (None, 300e6, None, 0.03),
    "mobilenetv2_075": (None, 209e6, None, 0.03),
    "mobilenetv2_050": (None, 97e6, None, 0.03),
    "mobilenetv2_035": (None, 59e6, None, 0.03),
    "resnet18": (None, 1.81e9, None, 0.03),
    "resnet10": (None, 0.89e9, None, 0.03),
}


@pytest.mark.parametrize("name", sorted(PAPER_TARGETS))
def test_paper_targets(name):
    params, madds, params_tol, madds_tol = PAPER_TARGETS[name]
    p = _reference_profile(name)
    assert p.input_size == (1, 3, 224, 224)
    if params is not None:
        assert abs(p.params / params - 1) <= params_tol, p
    assert abs(p.madds / madds - 1) <= madds_tol, p


def test_paper_target_dy_mobilenetv3_small():
    dy, static = _reference_profile("dy_mobilenetv3_small_100"), _reference_profile("mobilenetv3_small_100")
    assert abs(dy.params / 4.8e6 - 1) <= 0.12, dy
    assert 1.01 <= dy.madds / static.madds <= 1.08, (dy, static)


@pytest.mark.parametrize("name", _slow_unless(DYNAMIC, FAST))
def test_overhead_is_the_difference_to_the_static_twin(name):
    # the profiler's static-equivalent count of a DY model is, independently, its static twin's count
    size = (1, 1, 40) if name in ONE_D else (1, 3, 64, 64)
    dy_model = dyconv.create_model(name, in_channels=size[1])
    dy = dyconv.profile(dy_model, size)
    static = dyconv.profile(dyconv.create_model(dyconv.model_info(name).twin, in_channels=size[1]), size)
    assert dy.static_madds == static.madds
    assert dy.attention_madds > 0 and dy.mixing_madds > 0
    # mixing K kernels (and biases) costs one multiply-add per expert parameter per image
    expert_params = sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel())
                        for m in dy_model.modules() if isinstance(m, DYNAMIC_CONV_TYPES))
    assert dy.mixing_madds == expert_params


# ---------------------------------------------------------------- torchvision parity

TORCHVISION = {
    "mobilenetv2_100": ("mobilenet_v2", {}),
    "mobilenetv2_075": ("mobilenet_v2", {"width_mult": 0.75}),
    "mobilenetv2_050": ("mobilenet_v2", {"width_mult": 0.5}),
    "mobilenetv2_035": ("mobilenet_v2", {"width_mult": 0.35}),
    "mobilenetv3_small_100": ("mobilenet_v3_small", {}),
    "mobilenetv3_large_100": ("mobilenet_v3_large", {}),
    "resnet10": (None, {}),
    "resnet18": ("resnet18", {}),
    "resnet34": ("resnet34", {}),
    "resnet50": ("resnet50", {}),
}


def _torchvision_model(name):
    models = pytest.importorskip("torchvision.models")
    builder, kwargs = TORCHVISION[name]
    if builder is None:  # torchvision has no ResNet-10 builder; its ResNet class with one block per stage
        from torchvision.models.resnet import BasicBlock, ResNet

        return ResNet(BasicBlock, [1, 1, 1, 1])
    return getattr(models, builder)(weights=None, **kwargs)


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_static_twin_has_torchvisions_parameters(name):
    ours, theirs = dyconv.create_model(name), _torchvision_model(name)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("name", _slow_unless(sorted(TORCHVISION), FAST))
def test_static_twin_computes_torchvisions_function(name):
    # same weights, same function: torchvision's state dict loads and gives the same outputs and MAdds
    ours, theirs = dyconv.create_model(name).eval(), _torchvision_model(name).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    assert dyconv.profile(ours, (1, 3, 224, 224)).madds == dyconv.profile(theirs, (1, 3, 224, 224)).madds
