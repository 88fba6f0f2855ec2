"""Weight transfer between dyconv.DynamicConvNd (PyTorch) and dyconv.keras.DynamicConvND: same outputs."""

import numpy as np
import pytest
import torch

from keras_reference import TOL, keras, numpy

import dyconv
from dyconv.keras import DynamicConv1D, DynamicConv2D, DynamicConv3D, export_torch_weights, from_torch, to_torch

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

TORCH_LAYERS = {1: dyconv.DynamicConv1d, 2: dyconv.DynamicConv2d, 3: dyconv.DynamicConv3d}


def _torch_layer(rank, in_channels, out_channels, kernel_size, **kwargs):
    torch.manual_seed(0)
    layer = TORCH_LAYERS[rank](in_channels, out_channels, kernel_size, num_experts=3, **kwargs)
    with torch.no_grad():  # a non-uniform attention, so a wrong mapping of any weight shows
        for p in layer.router.parameters():
            p.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
        layer.temperature.fill_(1.5)
    return layer


def _torch_input(rank, channels, size, batch=4):
    torch.manual_seed(1)
    return torch.randn(batch, channels, *(size,) * rank) + torch.randn(batch, channels, *(1,) * rank)


CASES = [
    (2, 8, 16, 3, 9, {"padding": 1}),
    (2, 8, 16, 3, 10, {"stride": 2, "padding": 1}),  # PyTorch padding, no Keras string equivalent
    (2, 8, 16, 3, 9, {"padding": "same", "dilation": 2}),
    (2, 8, 16, 3, 9, {"groups": 4}),
    (2, 8, 8, 3, 9, {"groups": 8, "padding": 1, "bias": False}),
    (1, 6, 10, 5, 20, {"stride": 2, "padding": 2}),
    (3, 4, 6, 3, 5, {"padding": 1}),
]


@pytest.mark.parametrize("case, data_format", [(case, "channels_last") for case in CASES] + [
    (CASES[i], "channels_first") for i in (1, 4, 6)])
def test_from_torch_same_outputs(case, data_format):
    rank, cin, cout, k, size, kwargs = case
    torch_layer = _torch_layer(rank, cin, cout, k, **kwargs)
    x = _torch_input(rank, cin, size)
    with torch.no_grad():
        expected = torch_layer(x).numpy()
        expected_attention = torch_layer.attention(x).numpy()
    keras_layer = from_torch(torch_layer, data_format=data_format)
    inputs = x.numpy() if data_format == "channels_first" else np.moveaxis(x.numpy(), 1, -1)
    out = numpy(keras_layer(inputs))
    if data_format == "channels_last":
        out = np.moveaxis(out, -1, 1)
    np.testing.assert_allclose(numpy(keras_layer.attention(inputs)), expected_attention, **TOL)
    np.testing.assert_allclose(out, expected, **TOL)
    assert float(numpy(keras_layer.temperature)) == 1.5

    back = to_torch(keras_layer)  # and back: the identical PyTorch layer
    for key, value in torch_layer.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("rank, kwargs", [(2, {"padding": "same"}), (2, {"strides": 2}), (1, {"groups": 2}),
                                          (3, {"padding": "valid", "use_bias": False})])
def test_to_torch_same_outputs(rank, kwargs):
    keras.utils.set_random_seed(3)
    layer = (DynamicConv1D, DynamicConv2D, DynamicConv3D)[rank - 1](
        6, 3, 4, bias_initializer="random_normal", temperature=2.0, **kwargs)
    x = np.random.default_rng(0).standard_normal((3, *(7,) * rank, 4)).astype("float32")
    out = numpy(layer(x))
    torch_layer = to_torch(layer)
    with torch.no_grad():
        expected = torch_layer(torch.from_numpy(np.moveaxis(x, -1, 1))).numpy()
    np.testing.assert_allclose(out, np.moveaxis(expected, 1, -1), **TOL)


def test_transfer_errors():
    with pytest.raises(TypeError, match="Conv2d"):
        from_torch(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        from_torch(dyconv.DynamicConv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    causal = DynamicConv1D(4, 3, padding="causal")
    causal.build((None, 10, 4))
    with pytest.raises(ValueError, match="padding='causal'"):
        to_torch(causal)
    strided_same = DynamicConv2D(4, 3, strides=2, padding="same")
    strided_same.build((None, 10, 10, 4))
    with pytest.raises(ValueError, match="padding='same', strides=\\(2, 2\\)"):
        to_torch(strided_same)
    relu = DynamicConv2D(4, 3, activation="relu")
    relu.build((None, 10, 10, 4))
    with pytest.raises(ValueError, match="activation='relu'"):
        to_torch(relu)
    with pytest.raises(ValueError, match="built"):
        to_torch(DynamicConv2D(4, 3))
    with pytest.raises(ValueError, match="'weight'"):
        export_torch_weights(relu, dyconv.DynamicConv2d(4, 8, 3))
