"""Setting and annealing the softmax temperature of every dynamic layer in a model."""

from __future__ import annotations

from typing import Any

from torch import nn

from . import _args
from .layers import DYNAMIC_CONV_TYPES


def dynamic_layers(model: nn.Module) -> list[nn.Module]:
    """Every dynamic convolution layer in ``model`` (the model itself included)."""
    return [m for m in model.modules() if isinstance(m, DYNAMIC_CONV_TYPES)]


def set_temperature(model: nn.Module, value: float) -> int:
    """Set the temperature of every dynamic layer in ``model``; returns how many layers were set."""
    value = _args.positive_float(value, "temperature")
    layers = dynamic_layers(model)
    for layer in layers:
        layer.temperature.fill_(value)
    return len(layers)


def get_temperature(model: nn.Module) -> float | None:
    """The temperature of the first dynamic layer of ``model``, or ``None`` if it has none."""
    layers = dynamic_layers(model)
    return float(layers[0].temperature) if layers else None


def linear_temperature(step: int, start: float, end: float, total_steps: int) -> float:
    """``start`` at step 0, linearly to exactly ``end`` at ``total_steps``, then ``end``."""
    if step >= total_steps:
        return end
    return start + (end - start) * step / total_steps


class TemperatureScheduler:
    """Anneal the temperature of every dynamic layer linearly per step, then hold ``end``.

    Used like a learning-rate scheduler: call :meth:`step` after every optimizer step. The paper's
    recipe is the default: 30 → 1 over the first 10 epochs. Construction sets the temperature to
    ``start``; after ``epochs * steps_per_epoch`` calls to :meth:`step` it is exactly ``end``.

    Args:
        model: the model whose dynamic layers are driven.
        start, end: temperatures at the first step and from the end of the annealing on.
        epochs: length of the annealing in epochs (may be fractional, e.g. for short runs).
        steps_per_epoch: optimizer steps per epoch (1 to anneal once per epoch).

    Example:
        >>> sched = TemperatureScheduler(model, start=30.0, end=1.0, epochs=10, steps_per_epoch=len(loader))
        >>> for x, y in loader:
        ...     loss.backward(); optimizer.step(); sched.step()
    """

    def __init__(self, model: nn.Module, start: float = 30.0, end: float = 1.0, epochs: float = 10,
                 steps_per_epoch: int = 1):
        self.model = model
        self.start = _args.positive_float(start, "start")
        self.end = _args.positive_float(end, "end")
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs < 0:
            raise ValueError(f"epochs must be a non-negative number. Received: epochs={epochs!r}")
        self.epochs = epochs
        self.steps_per_epoch = _args.positive_int(steps_per_epoch, "steps_per_epoch")
        self.total_steps = int(round(epochs * self.steps_per_epoch))
        self.last_step = 0
        self._apply()

    @property
    def temperature(self) -> float:
        """The temperature for the current step."""
        return linear_temperature(self.last_step, self.start, self.end, self.total_steps)

    def _apply(self) -> None:
        set_temperature(self.model, self.temperature)

    def step(self) -> float:
        """Advance one step and set the new temperature; returns it."""
        self.last_step += 1
        self._apply()
        return self.temperature

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "total_steps": self.total_steps, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start = float(state["start"])
        self.end = float(state["end"])
        self.total_steps = int(state["total_steps"])
        self.last_step = int(state["last_step"])
        self._apply()
