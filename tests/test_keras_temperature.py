"""dyconv.keras.TemperatureScheduler and the temperature helpers."""

import numpy as np
import pytest

from keras_reference import keras

from dyconv.keras import DynamicConv1D, TemperatureScheduler, dynamic_layers, get_temperature, set_temperature

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


def _model():
    inputs = keras.Input((12, 3))
    x = DynamicConv1D(4, 3, 2, padding="same")(inputs)
    block = keras.Sequential([DynamicConv1D(4, 3, 2, groups=4), keras.layers.GlobalAveragePooling1D()])
    outputs = keras.layers.Dense(2)(block(x))
    return keras.Model(inputs, outputs)


class _Recorder(keras.callbacks.Callback):
    """Reads the layers' temperature variable before every step (after the scheduler has set it)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_begin(self, batch, logs=None):
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()
        self.seen.append([float(keras.ops.convert_to_numpy(layer.temperature.value))
                          for layer in dynamic_layers(self.model)])


def test_helpers_reach_nested_layers():
    model = _model()
    assert len(dynamic_layers(model)) == 2
    assert get_temperature(model) == 30.0
    assert set_temperature(model, 4.0) == 2
    assert [float(keras.ops.convert_to_numpy(layer.temperature.value)) for layer in dynamic_layers(model)] == [4.0] * 2
    with pytest.raises(ValueError, match="temperature=0"):
        set_temperature(model, 0)
    assert get_temperature(keras.Sequential([keras.layers.Dense(2)])) is None


def test_anneals_per_step_then_holds():
    model = _model()
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).standard_normal((20, 12, 3)).astype("float32")
    y = np.arange(20) % 2
    scheduler, recorder = TemperatureScheduler(start=9.0, end=1.0, epochs=2), _Recorder()
    model.fit(x, y, batch_size=5, epochs=3, verbose=0, callbacks=[scheduler, recorder])  # 4 steps per epoch
    expected = [9.0 - 8.0 * t / 8 for t in range(8)] + [1.0] * 4  # 9 -> 1 over 8 steps, then 1
    assert len(recorder.seen) == 12
    np.testing.assert_allclose(recorder.seen, np.array(expected)[:, None].repeat(2, 1), rtol=1e-6)
    assert get_temperature(model) == 1.0
    # fit() then continues where an earlier fit() stopped (initial_epoch)
    set_temperature(model, 30.0)
    model.fit(x, y, batch_size=5, epochs=2, initial_epoch=1, verbose=0,
              callbacks=[TemperatureScheduler(start=9.0, end=1.0, epochs=2)])
    assert get_temperature(model) == 1.0 + 8.0 / 8


def test_scheduler_errors():
    with pytest.raises(ValueError, match="start=0"):
        TemperatureScheduler(start=0)
    with pytest.raises(ValueError, match="epochs=-1"):
        TemperatureScheduler(epochs=-1)
    with pytest.raises(TypeError, match="steps_per_epoch=1.5"):
        TemperatureScheduler(steps_per_epoch=1.5)
    scheduler = TemperatureScheduler()
    scheduler.set_model(_model())
    scheduler.set_params({"epochs": 1, "steps": None})
    with pytest.raises(ValueError, match="steps_per_epoch"):
        scheduler.on_train_batch_begin(0)
