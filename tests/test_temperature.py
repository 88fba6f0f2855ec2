import pytest
import torch
from torch import nn

import dyconv
from dyconv import DynamicConv2d, TemperatureScheduler


def model():
    return nn.Sequential(DynamicConv2d(3, 4, 3), nn.ReLU(), DynamicConv2d(4, 4, 3), nn.Conv2d(4, 4, 1))


def temps(m):
    return [float(layer.temperature) for layer in m.modules() if isinstance(layer, DynamicConv2d)]


def test_set_temperature_sets_every_layer():
    m = model()
    assert dyconv.set_temperature(m, 5.0) == 2
    assert temps(m) == [5.0, 5.0]
    assert dyconv.get_temperature(m) == 5.0
    assert dyconv.get_temperature(nn.Linear(2, 2)) is None


def test_schedule_is_linear_and_reaches_end_exactly():
    m = model()
    sched = TemperatureScheduler(m, start=30.0, end=1.0, epochs=10, steps_per_epoch=7)
    assert temps(m) == [30.0, 30.0]
    values = [sched.step() for _ in range(70)]
    assert values[-1] == 1.0 and temps(m) == [1.0, 1.0]
    expected = [30.0 - 29.0 * (i + 1) / 70 for i in range(70)]
    assert values[:-1] == pytest.approx(expected[:-1])
    assert all(a > b for a, b in zip(values, values[1:]))
    for _ in range(5):
        assert sched.step() == 1.0  # held after the annealing


def test_schedule_resumes_from_state_dict():
    m1, m2 = model(), model()
    s1 = TemperatureScheduler(m1, epochs=2, steps_per_epoch=5)
    for _ in range(4):
        s1.step()
    s2 = TemperatureScheduler(m2, epochs=2, steps_per_epoch=5)
    s2.load_state_dict(s1.state_dict())
    assert temps(m2) == temps(m1)
    assert [s1.step() for _ in range(8)] == [s2.step() for _ in range(8)]


def test_zero_epochs_means_end_at_once():
    m = model()
    TemperatureScheduler(m, start=30.0, end=1.0, epochs=0, steps_per_epoch=3)
    assert temps(m) == [1.0, 1.0]


@pytest.mark.parametrize("kwargs,match", [(dict(start=0), "start=0"), (dict(end=-1.0), "end=-1.0"),
                                          (dict(epochs=-1), "epochs=-1"), (dict(steps_per_epoch=0), "steps_per_epoch=0")])
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TemperatureScheduler(model(), **kwargs)
