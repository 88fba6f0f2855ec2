"""MobileNetV3 (Howard et al., 2019) and DY-MobileNetV3 (Chen et al., 2020): one code, two conv layers.

The static models are torchvision's ``mobilenet_v3_small()`` / ``mobilenet_v3_large()`` (same layers, same
state-dict keys). The dynamic models use a dynamic convolution for every convolution except the stem: the
three of every bottleneck (expansion 1×1 where there is one, depthwise k×k, projection 1×1) and the final
1×1 convolution (96 → 576 in Small, 160 → 960 in Large). Where the paper is silent we chose:

- the squeeze-excitation block stays static: it already is an input-dependent attention, and its two 1×1
  convolutions run on a 1×1 pooled map, where mixing K kernels would cost K times the convolution itself;
- the final 1×1 convolution is dynamic (unlike DY-MobileNetV2's 320 → 1280): the paper's DY-MobileNetV3-Small
  adds 1.9M parameters to its static model; with this rule ours adds 1.84M, with the final 1×1 static only
  1.67M (``README.md``, "Models and their size");
- the classifier's two linear layers stay static.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from ._blocks import ConvLayer, ConvNormAct, dynamic_conv_layer, init_weights, make_divisible
from ._registry import PaperFigures, register_model

# torchvision's MobileNetV3 normalisation (TensorFlow's defaults)
_norm = functools.partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)

# in: input channels, k: depthwise kernel, exp: expanded channels, out: output channels,
# se: squeeze-excitation, act: RE = ReLU, HS = hard-swish, s: stride (Howard et al. 2019, Tables 1 and 2)
SMALL_SETTING = (
    # in, k, exp, out, se, act, s
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
)
LARGE_SETTING = (
    # in, k, exp, out, se, act, s
    (16, 3, 16, 16, False, "RE", 1),
    (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2),
    (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1),
    (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2),
    (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1),
)
_ACTIVATIONS = {"RE": nn.ReLU, "HS": nn.Hardswish}


class SqueezeExcitation(nn.Module):
    """Channel attention: global pool → 1×1 conv → ReLU → 1×1 conv → hard-sigmoid, scaling the input.

    Shape:
        ``(B, C, H, W)`` → ``(B, C, H, W)``.
    """

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3 bottleneck: [expansion 1×1] → depthwise k×k → [squeeze-excitation] → projection 1×1.

    ``conv_layer`` builds the expansion, depthwise and projection convolutions; the squeeze-excitation
    stays static. A residual is added when stride is 1 and the channels match.
    """

    def __init__(self, in_channels: int, kernel_size: int, expanded: int, out_channels: int, use_se: bool,
                 activation: str, stride: int, *, conv_layer: ConvLayer = nn.Conv2d):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2. Received: stride={stride!r}")
        act = _ACTIVATIONS[activation]
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(ConvNormAct(in_channels, expanded, 1, conv_layer=conv_layer, norm_layer=_norm,
                                      activation=act))
        layers.append(ConvNormAct(expanded, expanded, kernel_size, stride, groups=expanded, conv_layer=conv_layer,
                                  norm_layer=_norm, activation=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4, 8)))
        layers.append(ConvNormAct(expanded, out_channels, 1, conv_layer=conv_layer, norm_layer=_norm,
                                  activation=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.block(x)
        return self.block(x)


class MobileNetV3(nn.Module):
    """MobileNetV3 from a bottleneck table, built with ``conv_layer`` in its bottlenecks.

    Args:
        setting: rows ``(in, k, exp, out, se, act, s)``, e.g. :data:`SMALL_SETTING`.
        last_channels: width of the classifier's hidden layer (1024 for Small, 1280 for Large).
        num_classes: classifier outputs.
        in_channels: input channels.
        small_input: for 28×28 / 32×32 inputs: the stem convolution and the first stride-2 bottleneck use
            stride 1, so the total stride is 8 instead of 32 (28×28 → 4×4 before pooling). The parameters
            are unchanged.
        conv_layer: builds the bottlenecks' convolutions and the final 1×1 (stem and squeeze-excitation stay
            ``nn.Conv2d``).
        dropout: dropout in the classifier.

    Shape:
        ``(B, in_channels, H, W)`` → ``(B, num_classes)``.
    """

    def __init__(self, setting, last_channels: int, *, num_classes: int = 1000, in_channels: int = 3,
                 small_input: bool = False, conv_layer: ConvLayer = nn.Conv2d, dropout: float = 0.2):
        super().__init__()
        stem_channels = setting[0][0]
        features: list[nn.Module] = [
            ConvNormAct(in_channels, stem_channels, 3, 1 if small_input else 2, norm_layer=_norm,
                        activation=nn.Hardswish)
        ]
        first_downsample = True
        for cin, k, exp, cout, se, act, s in setting:
            if s == 2 and first_downsample:
                first_downsample = False
                if small_input:
                    s = 1
            features.append(InvertedResidual(cin, k, exp, cout, se, act, s, conv_layer=conv_layer))
        final_in = setting[-1][3]
        features.append(ConvNormAct(final_in, 6 * final_in, 1, conv_layer=conv_layer, norm_layer=_norm,
                                    activation=nn.Hardswish))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * final_in, last_channels),
            nn.Hardswish(inplace=True),
            nn.Dropout(dropout, inplace=True),
            nn.Linear(last_channels, num_classes),
        )
        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


_SOURCE = ("Chen et al. 2020 (arXiv 1912.03458); ImageNet 224x224. Their static figures differ from the "
           "MobileNetV3 paper's own (2.5M params, 56M MAdds), which torchvision's model matches")


def _build(setting, last_channels, num_classes, in_channels, small_input, dynamic_options=None) -> MobileNetV3:
    conv = nn.Conv2d if dynamic_options is None else dynamic_conv_layer(2, **dynamic_options)
    return MobileNetV3(setting, last_channels, num_classes=num_classes, in_channels=in_channels,
                       small_input=small_input, conv_layer=conv)


@register_model(twin="dy_mobilenetv3_small_100", paper=PaperFigures(2_900_000, 66_000_000, 67.4, _SOURCE))
def mobilenetv3_small_100(*, num_classes=1000, in_channels=3, small_input=False) -> MobileNetV3:
    """MobileNetV3-Small ×1.0 (torchvision's ``mobilenet_v3_small()``)."""
    return _build(SMALL_SETTING, 1024, num_classes, in_channels, small_input)


@register_model(twin="dy_mobilenetv3_large_100")
def mobilenetv3_large_100(*, num_classes=1000, in_channels=3, small_input=False) -> MobileNetV3:
    """MobileNetV3-Large ×1.0 (torchvision's ``mobilenet_v3_large()``)."""
    return _build(LARGE_SETTING, 1280, num_classes, in_channels, small_input)


@register_model(twin="mobilenetv3_small_100", paper=PaperFigures(4_800_000, 68_500_000, 70.3, _SOURCE))
def dy_mobilenetv3_small_100(*, num_classes=1000, in_channels=3, small_input=False, num_experts=4, reduction=4,
                             temperature=30.0) -> MobileNetV3:
    """DY-MobileNetV3-Small: every convolution but the stem and the squeeze-excitations dynamic."""
    options = {"num_experts": num_experts, "reduction": reduction, "temperature": temperature}
    return _build(SMALL_SETTING, 1024, num_classes, in_channels, small_input, options)


@register_model(twin="mobilenetv3_large_100")
def dy_mobilenetv3_large_100(*, num_classes=1000, in_channels=3, small_input=False, num_experts=4, reduction=4,
                             temperature=30.0) -> MobileNetV3:
    """DY-MobileNetV3-Large: every convolution but the stem and the squeeze-excitations dynamic."""
    options = {"num_experts": num_experts, "reduction": reduction, "temperature": temperature}
    return _build(LARGE_SETTING, 1280, num_classes, in_channels, small_input, options)
