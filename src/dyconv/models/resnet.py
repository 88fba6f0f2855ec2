"""ResNet (He et al., 2016) and DY-ResNet (Chen et al., 2020): one code, two conv layers.

The static models are torchvision's ``resnet18/34/50`` (ResNet v1.5: the stride of a bottleneck sits on its
3×3 convolution), with the same state-dict keys; ``resnet10`` is the same family with one block per stage.
The dynamic models use a dynamic convolution for every convolution except the stem: both convolutions of
a basic block, all three of a bottleneck, and the 1×1 downsample convolutions of the shortcuts (the paper
says "every convolution except the first"; the shortcuts are convolutions, so they are dynamic too).
"""

from __future__ import annotations

from torch import Tensor, nn

from ._blocks import ConvLayer, dynamic_conv_layer, init_weights
from ._registry import PaperFigures, register_model


class BasicBlock(nn.Module):
    """3×3 → 3×3 with a shortcut (ResNet-10/18/34).

    Shape:
        ``(B, in_channels, H, W)`` → ``(B, channels, ceil(H / stride), ceil(W / stride))``.
    """

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 conv_layer: ConvLayer = nn.Conv2d):
        super().__init__()
        self.conv1 = conv_layer(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv_layer(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (strided) → 1×1 with ×4 expansion and a shortcut (ResNet-50).

    Shape:
        ``(B, in_channels, H, W)`` → ``(B, 4 * channels, ceil(H / stride), ceil(W / stride))``.
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None, *,
                 conv_layer: ConvLayer = nn.Conv2d):
        super().__init__()
        self.conv1 = conv_layer(in_channels, channels, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = conv_layer(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = conv_layer(channels, channels * self.expansion, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(channels * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet of ``block``s, ``layers[i]`` blocks in stage ``i``, built with ``conv_layer`` after the stem.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage (4 stages of 64, 128, 256, 512 channels).
        num_classes: classifier outputs.
        in_channels: input channels.
        small_input: for 28×28 / 32×32 inputs: the stem is a 3×3 stride-1 convolution (instead of 7×7
            stride 2) and the 3×3 max-pool is left out, so the total stride is 8 instead of 32
            (28×28 → 4×4 before pooling). The stem has 9/49 of its parameters; nothing else changes.
        conv_layer: builds every convolution of the stages, shortcuts included (the stem stays ``nn.Conv2d``).

    Shape:
        ``(B, in_channels, H, W)`` → ``(B, num_classes)``.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int], *,
                 num_classes: int = 1000, in_channels: int = 3, small_input: bool = False,
                 conv_layer: ConvLayer = nn.Conv2d):
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts. Received: layers={layers!r}")
        self.in_planes = 64
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_stage(block, 64, layers[0], 1, conv_layer)
        self.layer2 = self._make_stage(block, 128, layers[1], 2, conv_layer)
        self.layer3 = self._make_stage(block, 256, layers[2], 2, conv_layer)
        self.layer4 = self._make_stage(block, 512, layers[3], 2, conv_layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self, linear_std=None)

    def _make_stage(self, block, channels: int, blocks: int, stride: int, conv_layer: ConvLayer) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != channels * block.expansion:
            downsample = nn.Sequential(
                conv_layer(self.in_planes, channels * block.expansion, 1, stride, 0, bias=False),
                nn.BatchNorm2d(channels * block.expansion),
            )
        stage = [block(self.in_planes, channels, stride, downsample, conv_layer=conv_layer)]
        self.in_planes = channels * block.expansion
        stage += [block(self.in_planes, channels, conv_layer=conv_layer) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


_SOURCE = "Chen et al. 2020 (arXiv 1912.03458); ImageNet 224x224"


def _build(block, layers, num_classes, in_channels, small_input, dynamic_options=None) -> ResNet:
    conv = nn.Conv2d if dynamic_options is None else dynamic_conv_layer(2, **dynamic_options)
    return ResNet(block, layers, num_classes=num_classes, in_channels=in_channels, small_input=small_input,
                  conv_layer=conv)


@register_model(twin="dy_resnet10", paper=PaperFigures(5_200_000, 890_000_000, 63.5, _SOURCE))
def resnet10(*, num_classes=1000, in_channels=3, small_input=False) -> ResNet:
    """ResNet-10: basic blocks, one per stage (torchvision's ``ResNet(BasicBlock, [1, 1, 1, 1])``)."""
    return _build(BasicBlock, (1, 1, 1, 1), num_classes, in_channels, small_input)


@register_model(twin="dy_resnet18", paper=PaperFigures(11_100_000, 1_810_000_000, 70.4, _SOURCE))
def resnet18(*, num_classes=1000, in_channels=3, small_input=False) -> ResNet:
    """ResNet-18 (torchvision's ``resnet18()``)."""
    return _build(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, small_input)


@register_model(twin="dy_resnet34")
def resnet34(*, num_classes=1000, in_channels=3, small_input=False) -> ResNet:
    """ResNet-34 (torchvision's ``resnet34()``)."""
    return _build(BasicBlock, (3, 4, 6, 3), num_classes, in_channels, small_input)


@register_model(twin="dy_resnet50")
def resnet50(*, num_classes=1000, in_channels=3, small_input=False) -> ResNet:
    """ResNet-50 (torchvision's ``resnet50()``, v1.5)."""
    return _build(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, small_input)


@register_model(twin="resnet10", paper=PaperFigures(18_600_000, 910_000_000, 67.7, _SOURCE))
def dy_resnet10(*, num_classes=1000, in_channels=3, small_input=False, num_experts=4, reduction=4,
                temperature=30.0) -> ResNet:
    """DY-ResNet-10: every convolution but the stem dynamic (shortcuts included)."""
    options = {"num_experts": num_experts, "reduction": reduction, "temperature": temperature}
    return _build(BasicBlock, (1, 1, 1, 1), num_classes, in_channels, small_input, options)


@register_model(twin="resnet18", paper=PaperFigures(42_700_000, 1_850_000_000, 72.7, _SOURCE))
def dy_resnet18(*, num_classes=1000, in_channels=3, small_input=False, num_experts=4, reduction=4,
                temperature=30.0) -> ResNet:
    """DY-ResNet-18: every convolution but the stem dynamic (shortcuts included)."""
    options = {"num_experts": num_experts, "reduction": reduction, "temperature": temperature}
    return _build(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, small_input, options)


@register_model(twin="resnet34")
def dy_resnet34(*, num_classes=1000, in_channels=3, small_input=False, num_experts=4, reduction=4,
                temperature=30.0) -> ResNet:
    """DY-ResNet-34: every convolution but the stem dynamic (shortcuts included)."""
    options = {"num_experts": num_experts, "reduction": reduction, "temperature": temperature}
    return _build(BasicBlock, (3, 4, 6, 3), num_classes, in_channels, small_input, options)


@register_model(twin="resnet50")
def dy_resnet50(*, num_classes=1000, in_channels=3, small_input=False, num_experts=4, reduction=4,
                temperature=30.0) -> ResNet:
    """DY-ResNet-50: every convolution but the stem dynamic (shortcuts included)."""
    options = {"num_experts": num_experts, "reduction": reduction, "temperature": temperature}
    return _build(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, small_input, options)
