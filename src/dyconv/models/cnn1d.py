"""A small 1-D CNN for MNIST-1D and its dynamic twin.

The static model has the layers of the CNN baseline of the MNIST-1D paper (Greydanus 2020, about 94 % test
accuracy; its repository's ``ConvBase``): three convolutions of 25 channels (kernel 5, then 3 and 3, all
stride 2, padding 1, with bias), ReLU after each, then one linear layer on the flattened 25 × 5 features.
For a 40-sample input the sequence lengths are 40 → 19 → 10 → 5, exactly as there (5 210 parameters).
One addition: an adaptive average pool to length 5 before flattening, which is the identity at length 40
and lets other lengths through. The dynamic twin makes the second and third convolutions dynamic (the
first is the stem); its attention hidden width is ``max(25 // reduction, 4)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._blocks import ConvLayer, dynamic_conv_layer
from ._registry import PaperFigures, register_model


class CNN1d(nn.Module):
    """Three strided 1-D convolutions with ReLU, then a linear classifier on the flattened features.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels (1 for MNIST-1D).
        channels: channels of every convolution.
        conv_layer: builds the second and third convolutions (the first stays ``nn.Conv1d``).

    Shape:
        ``(B, in_channels, L)`` → ``(B, num_classes)``, for any ``L >= 3``.
    """

    #: length of the feature sequence the classifier sees (that of a 40-sample input)
    feature_length = 5

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, channels: int = 25,
                 conv_layer: ConvLayer = nn.Conv1d):
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, channels, 5, 2, 1)
        self.conv2 = conv_layer(channels, channels, 3, 2, 1)
        self.conv3 = conv_layer(channels, channels, 3, 2, 1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool1d(self.feature_length)
        self.linear = nn.Linear(channels * self.feature_length, num_classes)
        # PyTorch's default initialisation everywhere, as the MNIST-1D baseline uses.

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        return self.linear(self.pool(x).flatten(1))


def _check_small_input(small_input: bool) -> None:
    if small_input:
        raise ValueError("cnn1d is already sized for 40-sample MNIST-1D inputs and has no downsampling stem to "
                         f"remove. Received: small_input={small_input!r}")


@register_model(twin="dy_cnn1d", input_size=(1, 1, 40), num_classes=10,
                paper=PaperFigures(top1=94.0, source="Greydanus 2020 (MNIST-1D): CNN baseline test accuracy, about 94 %"))
def cnn1d(*, num_classes=1000, in_channels=3, small_input=False) -> CNN1d:
    """The MNIST-1D paper's CNN baseline (pass ``num_classes=10, in_channels=1`` for MNIST-1D)."""
    _check_small_input(small_input)
    return CNN1d(num_classes=num_classes, in_channels=in_channels)


@register_model(twin="cnn1d", input_size=(1, 1, 40), num_classes=10)
def dy_cnn1d(*, num_classes=1000, in_channels=3, small_input=False, num_experts=4, reduction=4,
             temperature=30.0) -> CNN1d:
    """:func:`cnn1d` with its second and third convolutions dynamic."""
    _check_small_input(small_input)
    conv = dynamic_conv_layer(1, num_experts=num_experts, reduction=reduction, temperature=temperature)
    return CNN1d(num_classes=num_classes, in_channels=in_channels, conv_layer=conv)
