"""Keras test support: backend selection and a per-sample reference independent of dyconv.keras.

The backend comes from ``KERAS_BACKEND`` (the main test run uses ``torch``; ``scripts/test`` runs the
Keras tests again with ``jax`` and ``tensorflow``). A backend that is not installed skips the tests.
The reference mixes the layer's own kernels with NumPy (float64) and convolves each sample with
PyTorch's ``F.convNd`` after explicit zero padding, whose amounts are computed here from the
TensorFlow/Keras rule, not taken from the layer.
"""

import os

import numpy as np
import pytest

# dyconv first: it imports torch.utils.flop_counter, which imports triton, and importing triton after
# TensorFlow 2.21 crashes the process (segmentation fault) in this environment.
import dyconv  # noqa: E402,F401

BACKEND = os.environ.setdefault("KERAS_BACKEND", "torch")
pytest.importorskip({"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}.get(BACKEND, BACKEND))
keras = pytest.importorskip("keras")
if keras.backend.backend() != BACKEND:  # keras was imported earlier under another backend
    pytest.skip(f"keras already runs on {keras.backend.backend()}, not {BACKEND}", allow_module_level=True)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TOL = {"rtol": 1e-4, "atol": 1e-4}  # float32 layer against a float64 reference


def numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x.value if hasattr(x, "value") else x), dtype=np.float64)


def padding_pairs(padding, size, kernel_size, strides, dilation):
    """(before, after) per spatial dimension, by Keras' rules (TensorFlow's 'same', 'causal')."""
    pairs = []
    for i, (n, k, s, d) in enumerate(zip(size, kernel_size, strides, dilation)):
        span = d * (k - 1) + 1
        if padding == "valid":
            pairs.append((0, 0))
        elif padding == "causal":
            pairs.append((span - 1, 0))
        elif padding == "same":
            out = -(-n // s)
            total = max((out - 1) * s + span - n, 0)
            pairs.append((total // 2, total - total // 2))
        else:
            p = padding[i] if isinstance(padding, (tuple, list)) else padding
            pairs.append((p, p))
    return pairs


def reference_attention(layer, x):
    """softmax(Dense2(relu(Dense1(mean over space))) / temperature) in NumPy from the layer's weights."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(1, x.ndim - 1)) if layer.data_format == "channels_last" else tuple(range(2, x.ndim))
    pooled = x.mean(axis=axes)
    hidden = np.maximum(pooled @ numpy(layer.attention_hidden.kernel) + numpy(layer.attention_hidden.bias), 0)
    logits = (hidden @ numpy(layer.attention_logits.kernel) + numpy(layer.attention_logits.bias))
    logits = logits / numpy(layer.temperature)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reference_output(layer, x):
    """Each sample convolved with its own attention-mixed kernel (float64, PyTorch's F.convNd)."""
    x = np.asarray(x, np.float64)
    rank = x.ndim - 2
    if layer.data_format == "channels_last":
        x = np.moveaxis(x, -1, 1)
    attention = reference_attention(layer, x if layer.data_format == "channels_first" else np.moveaxis(x, 1, -1))
    kernel = numpy(layer.kernel)  # (K, *k, C_in/g, filters)
    bias = numpy(layer.bias) if layer.bias is not None else None
    pairs = padding_pairs(layer.padding, x.shape[2:], layer.kernel_size, layer.strides, layer.dilation_rate)
    pad = [p for pair in reversed(pairs) for p in pair]  # F.pad wants the last dimension first
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    outs = []
    for b in range(x.shape[0]):
        mixed = np.tensordot(attention[b], kernel, axes=1)  # (*k, C_in/g, filters)
        weight = torch.from_numpy(np.ascontiguousarray(np.moveaxis(mixed, (-1, -2), (0, 1))))
        sample = F.pad(torch.from_numpy(x[b : b + 1]), pad)
        out = conv(sample, weight, None, layer.strides, 0, layer.dilation_rate, layer.groups).numpy()
        if bias is not None:
            out = out + (attention[b] @ bias).reshape((1, -1) + (1,) * rank)
        outs.append(out)
    out = np.concatenate(outs)
    if layer.activation is not None:
        out = numpy(layer.activation(keras.ops.convert_to_tensor(out.astype(np.float32))))
    if layer.data_format == "channels_last":
        out = np.moveaxis(out, 1, -1)
    return out
