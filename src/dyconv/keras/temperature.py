"""Setting and annealing the softmax temperature of every Keras dynamic layer in a model."""

from __future__ import annotations

import keras

from .. import _args
from ..temperature import linear_temperature
from .layers import DYNAMIC_CONV_TYPES


def dynamic_layers(model: keras.layers.Layer) -> list:
    """Every dynamic convolution layer in ``model``, nested ones and the model itself included."""
    # Layer._flatten_layers is Keras 3's own recursive walk (used by Layer.layers/weights).
    return [layer for layer in model._flatten_layers(include_self=True, recursive=True)
            if isinstance(layer, DYNAMIC_CONV_TYPES)]


def set_temperature(model: keras.layers.Layer, value: float) -> int:
    """Set the temperature of every (built) dynamic layer in ``model``; returns how many were set."""
    value = _args.positive_float(value, "temperature")
    layers = [layer for layer in dynamic_layers(model) if layer.built]
    for layer in layers:
        layer.temperature.assign(value)
    return len(layers)


def get_temperature(model: keras.layers.Layer) -> float | None:
    """The temperature of the first built dynamic layer of ``model``, or ``None`` if it has none."""
    for layer in dynamic_layers(model):
        if layer.built:
            return float(keras.ops.convert_to_numpy(layer.temperature.value))
    return None


class TemperatureScheduler(keras.callbacks.Callback):
    """Keras callback: anneal the temperature of every dynamic layer linearly per step, then hold ``end``.

    The paper's recipe is the default: 30 → 1 over the first 10 epochs. Before training step ``t``
    (counted over all epochs from ``initial_epoch``) the temperature is
    ``start + (end - start) * t / (epochs * steps_per_epoch)``, and ``end`` from then on.

    Args:
        start, end: temperatures at the first step and from the end of the annealing on.
        epochs: length of the annealing in epochs (may be fractional).
        steps_per_epoch: steps in one epoch; by default taken from ``fit`` (``self.params['steps']``),
            needed only when ``fit`` does not know it (a dataset of unknown length).

    Example:
        >>> model.fit(x, y, epochs=20, callbacks=[TemperatureScheduler(start=30, end=1, epochs=10)])
    """

    def __init__(self, start: float = 30.0, end: float = 1.0, epochs: float = 10, steps_per_epoch: int | None = None):
        super().__init__()
        self.start = _args.positive_float(start, "start")
        self.end = _args.positive_float(end, "end")
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative number. Received: epochs={epochs!r}")
        self.epochs = epochs
        self.steps_per_epoch = None if steps_per_epoch is None else _args.positive_int(steps_per_epoch,
                                                                                          "steps_per_epoch")
        self._epoch = 0
        self.temperature = self.start

    def _steps(self) -> int:
        steps = self.steps_per_epoch or (self.params or {}).get("steps")
        if not steps:
            raise ValueError(
                "TemperatureScheduler needs the number of steps per epoch, and fit() does not know it (a "
                "dataset of unknown length). Pass steps_per_epoch=... Received: "
                f"steps_per_epoch={self.steps_per_epoch!r}, params['steps']={steps!r}"
            )
        return int(steps)

    def _apply(self, step: int) -> None:
        steps = self._steps()
        self.temperature = linear_temperature(step, self.start, self.end, int(round(self.epochs * steps)))
        # On the JAX backend fit() holds the variables' values outside the variables between steps;
        # a callback that writes a variable syncs them first, and fit() then reads them back.
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()
        set_temperature(self.model, self.temperature)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self._apply(self._epoch * self._steps() + batch)
