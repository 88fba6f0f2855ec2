"""``DynamicConv1D/2D/3D``: Keras 3 convolution layers with K attention-mixed kernels (all backends)."""

from __future__ import annotations

import keras
from keras import ops

from .. import _args
from .functional import dynamic_conv

# Keras names of the arguments that dyconv._args calls by their PyTorch names (for error messages).
_KERAS_NAMES = {"in_channels": "input channels", "out_channels": "filters", "stride": "strides",
                "dilation": "dilation_rate"}


def _expert_initializer(initializer, num_experts: int):
    """An initializer for ``(num_experts, *shape)`` that initialises each expert like one Keras kernel.

    Calling ``initializer`` on the stacked shape would count ``num_experts`` into the fans (a
    ``sqrt(num_experts)`` too small Glorot/He scale), so each expert is drawn separately. A Keras
    initializer with an integer seed returns the same values on every call; expert ``k`` therefore
    uses seed ``seed + k``, which keeps a seeded layer reproducible and its experts distinct.
    """

    def initialize(shape, dtype=None):
        experts = []
        for k in range(num_experts):
            init = initializer
            if isinstance(getattr(init, "seed", None), int) and hasattr(init, "get_config"):
                init = type(init).from_config({**init.get_config(), "seed": init.seed + k})
            experts.append(init(shape[1:], dtype=dtype))
        return ops.stack(experts)

    return initialize


class _DynamicConvND(keras.layers.Layer):
    """Rank-generic dynamic convolution (Chen et al., CVPR 2020). Use the 1-D/2-D/3-D subclasses.

    Per sample ``b`` (``K = num_experts``):

        pi_b = softmax(attention_logits(relu(attention_hidden(mean_spatial(x_b)))) / temperature)
        out_b = activation(conv(x_b, sum_k pi_bk kernel_k) + sum_k pi_bk bias_k)

    computed with the FLOPs of one convolution (see :mod:`dyconv.keras.functional`). There is no
    BatchNormalization inside the layer (unlike the Keras 2 sketch this layer replaces): follow it
    with ``keras.layers.BatchNormalization``, as the paper does, so a sample's output never depends
    on its batch-mates.

    Args (in the order of the Keras 2 ``DyConv2D`` sketch, then Keras' ``groups``):
        filters: number of output channels.
        kernel_size: int or tuple of ``rank`` ints.
        num_experts: K, the number of kernels mixed per sample (paper default 4).
        strides, dilation_rate: int or tuple of ``rank`` ints (both may exceed 1 together).
        padding: ``'valid'``, ``'same'`` (TensorFlow's rule, also with strides), ``'causal'``
            (1-D only), or an int / tuple of ints: symmetric zero padding as in PyTorch (an
            extension, so every :class:`dyconv.DynamicConv2d` can be converted exactly).
        data_format: ``'channels_last'`` (default from ``keras.config.image_data_format()``) or
            ``'channels_first'``.
        activation, use_bias, kernel_initializer, bias_initializer, kernel_regularizer,
        bias_regularizer, activity_regularizer, kernel_constraint, bias_constraint: as in
            ``keras.layers.Conv2D``; the kernel initializer is applied to each expert separately,
            the bias initializer to the biases.
        groups: input and output channels are split into ``groups`` groups (``groups`` equal to the
            input channels: depthwise).
        reduction: the attention's hidden width is ``max(in_channels // reduction, 4)`` (as in
            :class:`dyconv.DynamicConv2d`).
        temperature: initial softmax temperature; a non-trainable variable, saved with the model.
            Anneal it with :class:`dyconv.keras.TemperatureScheduler` (paper: 30 → 1 in 10 epochs).

    Weights:
        ``kernel``: ``(num_experts, *kernel_size, in_channels // groups, filters)``;
        ``bias``: ``(num_experts, filters)``; ``temperature``: scalar, non-trainable;
        ``attention_hidden`` and ``attention_logits``: the two Dense layers of the attention.
    """

    rank: int = 0

    def __init__(self, filters, kernel_size, num_experts=4, strides=1, padding="valid", data_format=None,
                 dilation_rate=1, activation=None, use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None,
                 activity_regularizer=None, kernel_constraint=None, bias_constraint=None, groups=1, *,
                 reduction=4, temperature=30.0, **kwargs):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if isinstance(padding, str):
            padding = padding.lower()
        self.spec = _args.conv_spec(self.rank, None, filters, kernel_size, strides, padding, dilation_rate,
                                    groups, "zeros", num_experts, reduction, temperature,
                                    keras_padding=True, names=_KERAS_NAMES)
        data_format = keras.config.image_data_format() if data_format is None else data_format
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(
                "data_format must be 'channels_last' or 'channels_first'. "
                f"Received: data_format={data_format!r}"
            )
        self.filters = self.spec.out_channels
        self.kernel_size = self.spec.kernel_size
        self.num_experts = self.spec.num_experts
        self.strides = self.spec.stride
        self.padding = self.spec.padding
        self.data_format = data_format
        self.dilation_rate = self.spec.dilation
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.groups = self.spec.groups
        self.reduction = self.spec.reduction
        self.initial_temperature = self.spec.temperature
        self.input_spec = keras.layers.InputSpec(min_ndim=self.rank + 2)

    @property
    def _channel_axis(self) -> int:
        return -1 if self.data_format == "channels_last" else 1

    def _spatial(self, shape) -> tuple:
        return tuple(shape[1:-1]) if self.data_format == "channels_last" else tuple(shape[2:])

    def build(self, input_shape):
        if len(input_shape) != self.rank + 2:
            raise ValueError(
                f"{type(self).__name__} expects inputs of rank {self.rank + 2} (batch, {self.rank} spatial "
                f"dims, channels). Received: input_shape={tuple(input_shape)}"
            )
        in_channels = input_shape[self._channel_axis]
        if in_channels is None:
            raise ValueError(
                f"{type(self).__name__} needs a known number of input channels. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        # Re-validate with the channels, so groups that do not divide them are reported by name.
        self.spec = _args.conv_spec(self.rank, in_channels, self.filters, self.kernel_size, self.strides,
                                    self.padding, self.dilation_rate, self.groups, "zeros", self.num_experts,
                                    self.reduction, self.initial_temperature, keras_padding=True,
                                    names=_KERAS_NAMES)
        self.input_spec = keras.layers.InputSpec(ndim=self.rank + 2, axes={self._channel_axis: in_channels})
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.num_experts, *self.kernel_size, in_channels // self.groups, self.filters),
            initializer=_expert_initializer(self.kernel_initializer, self.num_experts),
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
            trainable=True,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.num_experts, self.filters),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
                trainable=True,
            )
        else:
            self.bias = None
        self.temperature = self.add_weight(
            name="temperature",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_temperature),
            trainable=False,
            autocast=False,
        )
        self.attention_hidden = keras.layers.Dense(self.spec.hidden, activation="relu", name="attention_hidden",
                                                   dtype=self.dtype_policy)
        self.attention_logits = keras.layers.Dense(self.num_experts, name="attention_logits",
                                                   dtype=self.dtype_policy)
        self.attention_hidden.build((None, in_channels))
        self.attention_logits.build((None, self.spec.hidden))
        self.built = True

    def attention(self, inputs):
        """The ``(batch, num_experts)`` mixing weights: ``softmax(logits / temperature)``, rows sum to 1."""
        if not self.built:
            self.build(tuple(inputs.shape))
        spatial_axes = tuple(range(1, self.rank + 1)) if self.data_format == "channels_last" else \
            tuple(range(2, self.rank + 2))
        pooled = ops.mean(inputs, axis=spatial_axes)
        logits = self.attention_logits(self.attention_hidden(pooled))
        if self.num_experts == 1:  # softmax over one value is 1 (Keras warns about it)
            return ops.ones_like(logits)
        return ops.softmax(logits / ops.cast(self.temperature, logits.dtype), axis=-1)

    def call(self, inputs):
        attention = self.attention(inputs)
        padding = self.spec.padding_pairs(self._spatial(inputs.shape))
        outputs = dynamic_conv(inputs, self.kernel, self.bias, attention, self.strides, padding,
                               self.dilation_rate, self.groups, self.data_format)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        spatial = self.spec.output_size(self._spatial(input_shape))
        if any(n is not None and n <= 0 for n in spatial):
            raise ValueError(
                f"{type(self).__name__} gives an empty output for this input: output spatial size {spatial}. "
                f"Received: input_shape={tuple(input_shape)}, kernel_size={self.kernel_size}, "
                f"strides={self.strides}, dilation_rate={self.dilation_rate}, padding={self.padding!r}"
            )
        if self.data_format == "channels_last":
            return (input_shape[0], *spatial, self.filters)
        return (input_shape[0], self.filters, *spatial)

    def get_config(self):
        config = super().get_config()
        config.update({
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "num_experts": self.num_experts,
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
            "activity_regularizer": keras.regularizers.serialize(self.activity_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "bias_constraint": keras.constraints.serialize(self.bias_constraint),
            "groups": self.groups,
            "reduction": self.reduction,
            "temperature": self.initial_temperature,
        })
        return config


@keras.saving.register_keras_serializable(package="dyconv")
class DynamicConv1D(_DynamicConvND):
    """Dynamic 1-D convolution, a drop-in for ``keras.layers.Conv1D`` (see :class:`_DynamicConvND`).

    Shape: ``(batch, steps, channels)`` → ``(batch, new_steps, filters)`` (``channels_last``).

    Example:
        >>> layer = DynamicConv1D(16, 5, num_experts=4, padding="causal")
        >>> layer(keras.random.normal((2, 50, 8))).shape
        (2, 50, 16)
    """

    rank = 1


@keras.saving.register_keras_serializable(package="dyconv")
class DynamicConv2D(_DynamicConvND):
    """Dynamic 2-D convolution, a drop-in for ``keras.layers.Conv2D`` (see :class:`_DynamicConvND`).

    Shape: ``(batch, rows, cols, channels)`` → ``(batch, new_rows, new_cols, filters)`` (``channels_last``).

    Example:
        >>> layer = DynamicConv2D(32, 3, num_experts=4, strides=2, padding="same")
        >>> layer(keras.random.normal((2, 28, 28, 16))).shape
        (2, 14, 14, 32)
    """

    rank = 2


@keras.saving.register_keras_serializable(package="dyconv")
class DynamicConv3D(_DynamicConvND):
    """Dynamic 3-D convolution, a drop-in for ``keras.layers.Conv3D`` (see :class:`_DynamicConvND`).

    Shape: ``(batch, d1, d2, d3, channels)`` → ``(batch, new_d1, new_d2, new_d3, filters)`` (``channels_last``).

    Example:
        >>> layer = DynamicConv3D(8, (3, 3, 3), num_experts=2, padding="same")
        >>> layer(keras.random.normal((1, 6, 8, 8, 4))).shape
        (1, 6, 8, 8, 8)
    """

    rank = 3


DYNAMIC_CONV_TYPES = (DynamicConv1D, DynamicConv2D, DynamicConv3D)
