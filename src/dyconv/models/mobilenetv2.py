"""MobileNetV2 (Sandler et al., 2018) and DY-MobileNetV2 (Chen et al., 2020): one code, two conv layers.

The static models are torchvision's ``mobilenet_v2(width_mult=...)``: same layers, same channel rounding,
same state-dict keys. The dynamic models use a dynamic convolution for all three convolutions of every
inverted-residual block (expansion 1×1, depthwise 3×3, projection 1×1); the stem, the final 1×1
convolution (320 → 1280 at ×1.0) and the classifier stay static, which is what reproduces the paper's
parameter counts (``shared/spec`` §2).
"""

from __future__ import annotations

from torch import Tensor, nn

from ._blocks import ConvLayer, ConvNormAct, dynamic_conv_layer, init_weights, make_divisible
from ._registry import PaperFigures, register_model

# t: expansion, c: output channels (before the width multiplier), n: repeats, s: stride of the first repeat
INVERTED_RESIDUAL_SETTING = (
    # t, c, n, s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expansion 1×1 → depthwise 3×3 → linear projection 1×1, with a residual when shapes allow.

    With ``expand_ratio == 1`` the expansion is left out. ``conv_layer`` builds all three convolutions.

    Shape:
        ``(B, in_channels, H, W)`` → ``(B, out_channels, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, *,
                 conv_layer: ConvLayer = nn.Conv2d):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2. Received: stride={stride!r}")
        hidden = int(round(in_channels * expand_ratio))
        self.stride = stride
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(in_channels, hidden, 1, conv_layer=conv_layer, activation=nn.ReLU6))
        layers += [
            ConvNormAct(hidden, hidden, 3, stride, groups=hidden, conv_layer=conv_layer, activation=nn.ReLU6),
            conv_layer(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with a width multiplier, built with ``conv_layer`` in its inverted-residual blocks.

    Args:
        width_mult: scales every layer's channels (rounded with :func:`make_divisible`); the final 1×1
            convolution keeps 1280 channels below ×1.0.
        num_classes: classifier outputs.
        in_channels: input channels.
        small_input: for 28×28 / 32×32 inputs. The stem convolution and the first stride-2 stage (24
            channels) use stride 1, so the total stride is 8 instead of 32 (28×28 → 4×4 before pooling).
            The parameters are unchanged.
        conv_layer: builds the three convolutions of every block (the stem and final 1×1 stay ``nn.Conv2d``).
        dropout: dropout before the classifier.

    Shape:
        ``(B, in_channels, H, W)`` → ``(B, num_classes)``.
    """

    def __init__(self, width_mult: float = 1.0, *, num_classes: int = 1000, in_channels: int = 3,
                 small_input: bool = False, conv_layer: ConvLayer = nn.Conv2d, dropout: float = 0.2):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive. Received: width_mult={width_mult!r}")
        channels = make_divisible(32 * width_mult)
        last_channels = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [
            ConvNormAct(in_channels, channels, 3, 1 if small_input else 2, activation=nn.ReLU6)
        ]
        first_downsample = True
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_channels = make_divisible(c * width_mult)
            if s == 2 and first_downsample:
                first_downsample = False
                if small_input:
                    s = 1
            for i in range(n):
                features.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t,
                                                 conv_layer=conv_layer))
                channels = out_channels
        features.append(ConvNormAct(channels, last_channels, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))
        init_weights(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def _paper(params, madds, top1) -> PaperFigures:
    return PaperFigures(params, madds, top1, "Chen et al. 2020 (arXiv 1912.03458); ImageNet 224x224")


def _static(width_mult, num_classes, in_channels, small_input) -> MobileNetV2:
    return MobileNetV2(width_mult, num_classes=num_classes, in_channels=in_channels, small_input=small_input)


def _dynamic(width_mult, num_classes, in_channels, small_input, num_experts, reduction, temperature) -> MobileNetV2:
    conv = dynamic_conv_layer(2, num_experts=num_experts, reduction=reduction, temperature=temperature)
    return MobileNetV2(width_mult, num_classes=num_classes, in_channels=in_channels, small_input=small_input,
                       conv_layer=conv)


@register_model(twin="dy_mobilenetv2_100", paper=_paper(3_500_000, 300_000_000, 72.0))
def mobilenetv2_100(*, num_classes=1000, in_channels=3, small_input=False) -> MobileNetV2:
    """MobileNetV2 ×1.0 (torchvision's ``mobilenet_v2()``)."""
    return _static(1.0, num_classes, in_channels, small_input)


@register_model(twin="dy_mobilenetv2_075", paper=_paper(2_600_000, 209_000_000, 69.8))
def mobilenetv2_075(*, num_classes=1000, in_channels=3, small_input=False) -> MobileNetV2:
    """MobileNetV2 ×0.75 (torchvision's ``mobilenet_v2(width_mult=0.75)``)."""
    return _static(0.75, num_classes, in_channels, small_input)


@register_model(twin="dy_mobilenetv2_050", paper=_paper(2_000_000, 97_000_000, 65.4))
def mobilenetv2_050(*, num_classes=1000, in_channels=3, small_input=False) -> MobileNetV2:
    """MobileNetV2 ×0.5 (torchvision's ``mobilenet_v2(width_mult=0.5)``)."""
    return _static(0.5, num_classes, in_channels, small_input)


@register_model(twin="dy_mobilenetv2_035", paper=_paper(1_700_000, 59_000_000, 60.3))
def mobilenetv2_035(*, num_classes=1000, in_channels=3, small_input=False) -> MobileNetV2:
    """MobileNetV2 ×0.35 (torchvision's ``mobilenet_v2(width_mult=0.35)``)."""
    return _static(0.35, num_classes, in_channels, small_input)


@register_model(twin="mobilenetv2_100", paper=_paper(11_100_000, 312_900_000, 75.2))
def dy_mobilenetv2_100(*, num_classes=1000, in_channels=3, small_input=False, num_experts=4, reduction=4,
                       temperature=30.0) -> MobileNetV2:
    """DY-MobileNetV2 ×1.0: every inverted-residual convolution dynamic."""
    return _dynamic(1.0, num_classes, in_channels, small_input, num_experts, reduction, temperature)


@register_model(twin="mobilenetv2_075", paper=_paper(7_000_000, 217_500_000, 73.7))
def dy_mobilenetv2_075(*, num_classes=1000, in_channels=3, small_input=False, num_experts=4, reduction=4,
                       temperature=30.0) -> MobileNetV2:
    """DY-MobileNetV2 ×0.75: every inverted-residual convolution dynamic."""
    return _dynamic(0.75, num_classes, in_channels, small_input, num_experts, reduction, temperature)


@register_model(twin="mobilenetv2_050", paper=_paper(4_000_000, 101_400_000, 69.9))
def dy_mobilenetv2_050(*, num_classes=1000, in_channels=3, small_input=False, num_experts=4, reduction=4,
                       temperature=30.0) -> MobileNetV2:
    """DY-MobileNetV2 ×0.5: every inverted-residual convolution dynamic."""
    return _dynamic(0.5, num_classes, in_channels, small_input, num_experts, reduction, temperature)


@register_model(twin="mobilenetv2_035", paper=_paper(2_800_000, 62_000_000, 65.9))
def dy_mobilenetv2_035(*, num_classes=1000, in_channels=3, small_input=False, num_experts=4, reduction=4,
                       temperature=30.0) -> MobileNetV2:
    """DY-MobileNetV2 ×0.35: every inverted-residual convolution dynamic."""
    return _dynamic(0.35, num_classes, in_channels, small_input, num_experts, reduction, temperature)
