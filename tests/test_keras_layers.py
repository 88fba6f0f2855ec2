"""dyconv.keras.DynamicConv1D/2D/3D on the backend named by KERAS_BACKEND (torch by default)."""

import inspect

import numpy as np
import pytest

from keras_reference import BACKEND, TOL, keras, numpy, reference_attention, reference_output

from dyconv.keras import DynamicConv1D, DynamicConv2D, DynamicConv3D, get_temperature, set_temperature

LAYERS = {1: DynamicConv1D, 2: DynamicConv2D, 3: DynamicConv3D}
KERAS_CONV = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}


pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


def _input(shape, seed=0, channels_last=True):
    """Random input whose samples differ in their channel means too (so their attentions differ)."""
    rng = np.random.default_rng(seed)
    offset_shape = [1] * len(shape)
    offset_shape[0] = shape[0]
    offset_shape[-1 if channels_last else 1] = shape[-1 if channels_last else 1]
    return (rng.standard_normal(shape) + rng.standard_normal(offset_shape)).astype("float32")


def _input_shape(rank, channels, size, data_format, batch=3):
    spatial = (size,) * rank if isinstance(size, int) else tuple(size)
    return (batch, *spatial, channels) if data_format == "channels_last" else (batch, channels, *spatial)


def _randomize_attention(layer, seed=1):
    """Give the attention weights large random values and temperature 1, so the mixtures differ per sample."""
    rng = np.random.default_rng(seed)
    for dense in (layer.attention_hidden, layer.attention_logits):
        dense.kernel.assign(rng.standard_normal(dense.kernel.shape).astype("float32"))
        dense.bias.assign(rng.standard_normal(dense.bias.shape).astype("float32"))
    if layer.bias is not None:
        layer.bias.assign(rng.standard_normal(layer.bias.shape).astype("float32"))
    layer.temperature.assign(1.0)


# rank, channels, filters, kernel_size, spatial size, keyword arguments
CASES = [
    (2, 8, 16, 3, 9, {}),
    (2, 8, 16, 3, 9, {"padding": "same"}),
    (2, 8, 16, 3, 10, {"strides": 2, "padding": "same"}),
    (2, 8, 16, 3, 11, {"strides": 2, "padding": "same"}),
    (2, 8, 12, (3, 1), (9, 7), {"strides": (2, 1)}),
    (2, 8, 16, 3, 11, {"dilation_rate": 2, "padding": "same"}),
    (2, 8, 16, 3, 11, {"dilation_rate": 2, "strides": 2}),
    (2, 8, 16, 3, 9, {"groups": 4, "padding": "same"}),
    (2, 8, 16, 3, 10, {"groups": 8, "strides": 2, "padding": "same"}),  # depthwise, multiplier 2
    (2, 8, 8, 5, 9, {"groups": 8, "padding": 2}),  # depthwise, PyTorch-style explicit padding
    (2, 8, 16, 1, 6, {"use_bias": False}),
    (2, 3, 16, 3, 9, {"activation": "relu"}),
    (1, 6, 10, 5, 20, {"padding": "causal", "dilation_rate": 2}),
    (1, 6, 12, 4, 21, {"strides": 3, "groups": 3}),
    (3, 4, 6, 3, 6, {"padding": "same"}),
    (3, 4, 8, (3, 2, 1), (5, 6, 4), {"strides": (1, 2, 1), "groups": 2}),
]


# channels_first on the cases where the layout changes the code path (groups, depthwise, 1-D, 3-D)
FORMAT_CASES = [(case, "channels_last") for case in CASES] + [
    (CASES[i], "channels_first") for i in (2, 7, 8, 12, 15)]
# On jax and tensorflow every new shape compiles, so their default run keeps the cases that cover each
# feature once (strided 'same', strides with dilation, groups, depthwise, explicit padding, no bias, 1-D
# causal, 1-D/3-D grouped, both formats); the rest run with --runslow (as in CI).
CORE = {(2, "channels_last"), (6, "channels_last"), (7, "channels_last"), (9, "channels_last"),
        (10, "channels_last"), (12, "channels_last"), (13, "channels_last"), (15, "channels_last"),
        (8, "channels_first"), (15, "channels_first")}
FORMAT_CASES = [
    pytest.param(case, fmt, marks=() if BACKEND == "torch" or (CASES.index(case), fmt) in CORE else pytest.mark.slow)
    for case, fmt in FORMAT_CASES
]


@pytest.mark.parametrize("case, data_format", FORMAT_CASES)
def test_matches_per_sample_reference(case, data_format):
    rank, channels, filters, kernel_size, size, kwargs = case
    layer = LAYERS[rank](filters, kernel_size, 3, data_format=data_format, **kwargs)
    shape = _input_shape(rank, channels, size, data_format)
    x = _input(shape, channels_last=data_format == "channels_last")
    layer.build(shape)
    _randomize_attention(layer)
    out = numpy(layer(x))
    expected = reference_output(layer, x)
    assert out.shape == expected.shape == layer.compute_output_shape(shape)
    np.testing.assert_allclose(out, expected, **TOL)
    # the mixtures really differ between samples (else a batch-shared kernel would pass too)
    attention = numpy(layer.attention(x))
    assert np.abs(attention[0] - attention[1]).max() > 1e-3


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_attention(data_format):
    layer = DynamicConv2D(8, 3, 5, data_format=data_format, temperature=2.0)
    x = _input(_input_shape(2, 6, 7, data_format, batch=4), channels_last=data_format == "channels_last")
    attention = numpy(layer.attention(x))
    assert attention.shape == (4, 5)
    np.testing.assert_allclose(attention.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(attention, reference_attention(layer, x), **TOL)
    assert layer.attention_hidden.units == 4  # max(6 // 4, 4), as in the PyTorch layer


@pytest.mark.parametrize("rank, kwargs", [
    (2, {"padding": "valid"}),
    (2, {"padding": "same"}),
    (2, {"padding": "same", "strides": 2}),
    (2, {"padding": "valid", "strides": 3, "dilation_rate": 1}),
    (2, {"padding": "same", "dilation_rate": 2}),
    (2, {"padding": "same", "groups": 4}),
    (1, {"padding": "causal", "dilation_rate": 3}),
    (1, {"padding": "same", "strides": 2}),
    (3, {"padding": "same", "strides": 2}),
])
def test_one_expert_equals_keras_conv(rank, kwargs):
    """With K = 1 the attention is 1 and the layer is keras.layers.ConvND with the same kernel and bias."""
    x = _input(_input_shape(rank, 8, 9, "channels_last"))
    layer = LAYERS[rank](8, 3, 1, bias_initializer="random_normal", **kwargs)
    conv = KERAS_CONV[rank](8, 3, **kwargs)
    layer.build(x.shape)
    conv.build(x.shape)
    conv.kernel.assign(numpy(layer.kernel)[0].astype("float32"))
    conv.bias.assign(numpy(layer.bias)[0].astype("float32"))
    np.testing.assert_allclose(numpy(layer(x)), numpy(conv(x)), **TOL)
    assert layer.compute_output_shape(x.shape) == conv.compute_output_shape(x.shape)


SHAPE_CASES = [
    {}, {"strides": 2}, {"strides": 2, "padding": "same"}, {"strides": (1, 3), "padding": "same"},
    {"dilation_rate": 2}, {"dilation_rate": (1, 3), "padding": "same"}, {"groups": 2}, {"groups": 4},
    {"kernel_size": (5, 1), "strides": (2, 1)},
]


@pytest.mark.parametrize("kwargs, size", [(kw, (13, 16)) for kw in SHAPE_CASES] + [
    (kw, (None, None)) for kw in SHAPE_CASES if not (kw.get("padding") == "same" and kw.get("strides"))])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_output_shape_before_call(kwargs, size, data_format):
    kwargs = {"kernel_size": 3, **kwargs}
    shape = (None, *size, 4) if data_format == "channels_last" else (None, 4, *size)
    layer = DynamicConv2D(8, num_experts=2, data_format=data_format, **kwargs)
    conv = keras.layers.Conv2D(8, data_format=data_format, **kwargs)
    assert not layer.built
    assert layer.compute_output_shape(shape) == conv.compute_output_shape(shape)
    if size[0] is not None and BACKEND == "torch":  # (the reference tests check real outputs on every backend)
        x = _input((2, *shape[1:]))
        assert numpy(layer(x)).shape == (2, *layer.compute_output_shape(shape)[1:])


@pytest.mark.parametrize("kwargs", SHAPE_CASES[:3] + SHAPE_CASES[6:8], ids=str)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_empty_batch_like_keras_conv(kwargs, data_format):
    """A batch of zero samples gives the empty output of the shape keras.layers.Conv2D declares for it (the reshapes
    once failed on it). Conv2D's own call is not the reference: on TensorFlow 2.21 it fails on an empty batch (its
    convolution returns the input's shape, then the bias add raises or the wrong shape comes back)."""
    kwargs = {"kernel_size": 3, **kwargs}
    shape = _input_shape(2, 4, (7, 8), data_format, batch=0)
    layer = DynamicConv2D(8, num_experts=2, data_format=data_format, **kwargs)
    conv = keras.layers.Conv2D(8, data_format=data_format, **kwargs)
    expected = tuple(conv.compute_output_shape(shape))
    assert expected[0] == 0 and 0 not in expected[1:]
    assert numpy(layer(_input(shape))).shape == expected


def test_weights_and_initializers():
    layer = DynamicConv2D(32, 3, 4, groups=2, bias_initializer="ones")
    layer.build((None, 16, 16, 64))
    assert tuple(layer.kernel.shape) == (4, 3, 3, 32, 32)
    assert tuple(layer.bias.shape) == (4, 32)
    np.testing.assert_array_equal(numpy(layer.bias), 1.0)  # the bias initializer, not the kernel's
    kernel = numpy(layer.kernel)
    # Glorot uniform per expert: fans of one (3, 3, 32, 32) kernel, not of the stacked (4, ...) array
    limit = np.sqrt(6.0 / (9 * 32 + 9 * 32))
    # the float32 kernel's bound is the limit rounded to float32 (0.10206207633, above the float64 0.10206207262; a
    # jax run drew exactly that value)
    assert 0.95 * limit < np.abs(kernel).max() <= np.float32(limit)
    assert all(np.abs(kernel[i] - kernel[j]).max() > 0.1 for i in range(4) for j in range(i))
    assert not layer.temperature.trainable
    assert float(numpy(layer.temperature)) == 30.0
    names = sorted(v.path.split("/")[-1] for v in layer.trainable_variables)
    assert names == ["bias", "bias", "bias", "kernel", "kernel", "kernel"]
    assert len(layer.non_trainable_variables) == 1


def test_seeded_initializer_is_reproducible_with_distinct_experts():
    def kernel(seed):
        layer = DynamicConv1D(4, 3, 3, kernel_initializer=keras.initializers.HeNormal(seed=seed))
        layer.build((None, 10, 4))
        return numpy(layer.kernel)

    a, b = kernel(7), kernel(7)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[0] - a[1]).max() > 0.1 and np.abs(a[1] - a[2]).max() > 0.1


@pytest.mark.parametrize("kwargs, match", [
    ({"num_experts": 0}, "num_experts=0"),
    ({"num_experts": 2.5}, "num_experts=2.5"),
    ({"filters": 0}, "filters=0"),
    ({"kernel_size": (3, 3, 3)}, r"kernel_size=\(3, 3, 3\)"),
    ({"strides": 0}, "strides=0"),
    ({"dilation_rate": (1, 0)}, r"dilation_rate=\(1, 0\)"),
    ({"padding": "full"}, "padding='full'"),
    ({"padding": "causal"}, "causal"),
    ({"groups": 0}, "groups=0"),
    ({"filters": 6, "groups": 4}, "filters=6, groups=4"),
    ({"reduction": 0}, "reduction=0"),
    ({"temperature": 0.0}, "temperature=0.0"),
    ({"data_format": "NHWC"}, "data_format='NHWC'"),
])
def test_errors(kwargs, match):
    kwargs = {"filters": 8, "kernel_size": 3, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        DynamicConv2D(**kwargs)


def test_build_errors():
    with pytest.raises(ValueError, match="input channels=6, groups=4"):
        DynamicConv2D(8, 3, groups=4).build((None, 9, 9, 6))
    with pytest.raises(ValueError, match="known number of input channels"):
        DynamicConv2D(8, 3).build((None, 9, 9, None))
    with pytest.raises(ValueError, match="rank 4"):
        DynamicConv2D(8, 3).build((None, 9, 6))
    with pytest.raises(ValueError, match="empty output"):
        DynamicConv2D(8, 5).compute_output_shape((None, 3, 3, 4))


def test_config_round_trip():
    layer = DynamicConv2D(
        16, (3, 5), 3, strides=(2, 1), padding="same", data_format="channels_first", dilation_rate=1,
        activation="relu", use_bias=False, kernel_initializer="he_normal", bias_initializer="ones",
        kernel_regularizer="l2", bias_regularizer="l1", activity_regularizer="l2",
        kernel_constraint="non_neg", bias_constraint="max_norm", groups=2, reduction=8, temperature=5.0,
        name="dy",
    )
    config = layer.get_config()
    for parameter in inspect.signature(DynamicConv2D.__init__).parameters:
        if parameter not in ("self", "kwargs"):
            assert parameter in config, parameter
    clone = DynamicConv2D.from_config(config)
    assert clone.get_config() == config
    assert (clone.kernel_size, clone.strides, clone.padding, clone.groups, clone.reduction) == (
        (3, 5), (2, 1), "same", 2, 8)
    assert clone.initial_temperature == 5.0 and clone.data_format == "channels_first"
    serialized = keras.saving.serialize_keras_object(layer)
    assert type(keras.saving.deserialize_keras_object(serialized)) is DynamicConv2D


def _model(rank=2, data_format="channels_last"):
    shape = (8,) * rank + (3,) if data_format == "channels_last" else (3,) + (8,) * rank
    inputs = keras.Input(shape)
    x = LAYERS[rank](8, 3, 4, padding="same", data_format=data_format)(inputs)
    x = keras.layers.BatchNormalization(axis=-1 if data_format == "channels_last" else 1)(x)
    x = keras.layers.Activation("relu")(x)
    x = LAYERS[rank](8, 3, 2, strides=2, groups=8, data_format=data_format)(x)  # depthwise
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3)(x)
    return keras.Model(inputs, outputs)


def test_keras_file_round_trip(tmp_path):
    model = _model()
    set_temperature(model, 2.5)
    x = _input((5, 8, 8, 3))
    expected = numpy(model.predict(x, verbose=0))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert get_temperature(loaded) == 2.5
    np.testing.assert_allclose(numpy(loaded.predict(x, verbose=0)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_predict_ragged_batches(jit_compile):
    if jit_compile and BACKEND == "torch":
        pytest.skip("torch.compile of a training step is too slow for the default run")
    if not jit_compile and BACKEND == "jax":
        pytest.skip("Keras on jax without jit runs the training step op by op (minutes); jit is jax's default")
    keras.utils.set_random_seed(0)
    model = _model()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    x = _input((10, 8, 8, 3))
    y = np.arange(10) % 3
    before = [numpy(w) for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0)  # batches 4, 4, 2
    assert all(np.isfinite(history.history["loss"]))
    after = [numpy(w) for w in model.trainable_weights]
    assert all(np.abs(a - b).max() > 0 for a, b in zip(after, before))  # every weight trained
    prediction = numpy(model.predict(x, batch_size=3, verbose=0))  # batches 3, 3, 3, 1
    assert prediction.shape == (10, 3) and np.isfinite(prediction).all()
    # a sample's prediction does not depend on its batch-mates or the batch size
    np.testing.assert_allclose(numpy(model.predict(x, batch_size=10, verbose=0)), prediction, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(numpy(model.predict(x[7:8], verbose=0)), prediction[7:8], rtol=1e-4, atol=1e-5)


def test_batch_of_one_trains():
    model = _model(rank=1)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss = model.train_on_batch(_input((1, 8, 3)), np.array([1]))
    assert np.isfinite(loss)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function and XLA are TensorFlow features")
@pytest.mark.parametrize("jit_compile", [False, True])
def test_tf_function_unknown_batch(jit_compile):
    import tensorflow as tf

    layer = DynamicConv2D(8, 3, 4, strides=2, padding="same", groups=2)
    depthwise = DynamicConv2D(8, 3, 2, groups=8, data_format="channels_last")
    x = _input((5, 10, 10, 4))
    layer.build(x.shape)
    depthwise.build((None, 5, 5, 8))
    same = DynamicConv2D(8, 3, 2, padding="same")
    same.build((None, None, None, 4))
    _randomize_attention(layer)

    @tf.function(input_signature=[tf.TensorSpec((None, 10, 10, 4), tf.float32)], jit_compile=jit_compile)
    def forward(inputs):
        return depthwise(layer(inputs))

    concrete = forward.get_concrete_function()
    assert concrete.structured_outputs.shape.as_list() == [None, 3, 3, 8]
    for batch in (5, 2, 1):  # one trace, any batch size
        out = forward(tf.constant(x[:batch])).numpy()
        np.testing.assert_allclose(out, numpy(depthwise(layer(x[:batch]))), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(numpy(layer(x)), reference_output(layer, x), **TOL)

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 4), tf.float32)], jit_compile=jit_compile)
    def unknown_size(inputs):  # unknown spatial size too ('same' with stride 1)
        return same(inputs)

    np.testing.assert_allclose(unknown_size(tf.constant(x[:2])).numpy(), reference_output(same, x[:2]), **TOL)


def test_dyconv_imports_after_tensorflow_without_triton():
    # importing triton after TensorFlow 2.21 crashes the process; dyconv must not import it on import
    import os
    import subprocess
    import sys

    code = "import sys, tensorflow, dyconv, dyconv.keras; assert 'triton' not in sys.modules"
    pytest.importorskip("tensorflow")
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
