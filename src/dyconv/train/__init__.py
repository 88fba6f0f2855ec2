"""Training: :func:`fit` runs a resumable (optionally distributed) training of a registry model on a dataset.

Example:
    >>> from dyconv.train import fit
    >>> results = fit(model="dy_resnet10", dataset="fashion-mnist", epochs=5, output="runs/dy_resnet10")
    >>> results["test_acc"], results["params"]
"""

from .analysis import attention_statistics, uniform_attention
from .config import TrainConfig, load_config_file, parse_kwargs, parse_temperature
from .fit import count_parameters, evaluate, evaluate_checkpoint, fit, model_kwargs_for

__all__ = ["TrainConfig", "attention_statistics", "count_parameters", "evaluate", "evaluate_checkpoint", "fit",
           "load_config_file", "model_kwargs_for", "parse_kwargs", "parse_temperature", "uniform_attention"]
