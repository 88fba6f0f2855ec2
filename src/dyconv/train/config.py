"""The training recipe as one dataclass, with the parsers the command line and YAML config files share."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Runs shorter than the paper's 10 annealing epochs anneal over this fraction of their length instead.
SHORT_RUN_ANNEAL_FRACTION = 0.5
PAPER_ANNEAL_EPOCHS = 10.0


@dataclass
class TrainConfig:
    """Everything that determines a training run. Field names are the command line's ``--options`` (with
    ``-`` for ``_``) and the keys of a ``--config`` YAML file.

    Example:
        >>> config = TrainConfig(model="dy_resnet10", dataset="fashion-mnist", epochs=2, output="runs/a")
    """

    model: str = ""
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    output: str = "runs/run"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"  # sgd (Nesterov momentum) or adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4  # not applied to biases and normalisation parameters
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    # "START:END:EPOCHS" anneals linearly per step; "T" holds T; None: the paper's 30:1 over 10 epochs
    # (over SHORT_RUN_ANNEAL_FRACTION of the run when it is shorter than 10 epochs).
    temperature: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    val_fraction: float = 0.1
    split_seed: int = 0
    train_subset: int | None = None
    image_size: int = 32
    limit_train_batches: int | None = None
    stop_after: int | None = None  # stop this invocation after this many epochs (resume continues)
    resume: bool = False
    amp: bool = False
    amp_dtype: str = "bfloat16"  # bfloat16 or float16 (float16 only on CUDA, with gradient scaling)
    device: str = "auto"  # auto: CUDA (this process's local rank) when available, else CPU
    num_workers: int = 0
    threads: int | None = None  # torch intra-op threads (None: PyTorch's default); 1 is fastest on a busy CPU
    sync_bn: bool = False
    progress: bool = True
    eval_test: bool = True  # evaluate on the test split after the last epoch
    attention_stats: bool = True  # write attention.json (entropy, per-class attention) for DY models
    download: bool = True  # allow downloading Fashion-MNIST when missing

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive. Received: lr={self.lr!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw'. Received: optimizer={self.optimizer!r}")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be 'bfloat16' or 'float16'. Received: amp_dtype={self.amp_dtype!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1). Received: label_smoothing={self.label_smoothing!r}")
        if self.temperature is not None:
            parse_temperature(self.temperature, self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown training option(s) {unknown}. Known: {sorted(known)}")
        return cls(**values)


def parse_temperature(spec: str | float | None, epochs: float) -> tuple[float, float, float]:
    """``(start, end, anneal_epochs)`` from ``"START:END:EPOCHS"``, ``"START:END"`` or a constant ``"T"``.

    ``None`` is the paper's recipe: 30 → 1 over 10 epochs, or over ``SHORT_RUN_ANNEAL_FRACTION`` × ``epochs``
    when the run is shorter than 10 epochs. ``"30:1"`` uses the same default length.

    Example:
        >>> parse_temperature("30:1:10", 100), parse_temperature("1", 5), parse_temperature(None, 4)
        ((30.0, 1.0, 10.0), (1.0, 1.0, 0.0), (30.0, 1.0, 2.0))
    """
    default_len = PAPER_ANNEAL_EPOCHS if epochs >= PAPER_ANNEAL_EPOCHS else SHORT_RUN_ANNEAL_FRACTION * epochs
    if spec is None:
        return 30.0, 1.0, default_len
    parts = str(spec).split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or any(v == 0 for v in values[:2]):
        raise ValueError("temperature must be 'START:END:EPOCHS', 'START:END' or a constant 'T' with positive "
                         f"temperatures and non-negative epochs. Received: temperature={spec!r}")
    if len(values) == 1:
        return values[0], values[0], 0.0
    if len(values) == 2:
        return values[0], values[1], default_len
    return values[0], values[1], values[2]


def parse_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``["num_experts=2", "reduction=8"]`` → ``{"num_experts": 2, "reduction": 8}`` (values read as YAML)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"model kwargs must look like key=value. Received: {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The options in a YAML file (a mapping from option name to value)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"A config file must hold a mapping of options. Received: {type(data).__name__} in {path}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=True))
