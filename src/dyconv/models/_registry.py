"""The model registry: ``create_model(name, ...)``, ``list_models(pattern)`` and each model's metadata.

Builders register with :func:`register_model`. A builder is a keyword-only function; its signature is the
list of options the model accepts, so ``create_model`` can reject anything else with a message that names
it. A builder with a ``num_experts`` parameter builds a dynamic model.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

#: Options that only dynamic (``dy_``) models take.
DYNAMIC_OPTIONS = ("num_experts", "reduction", "temperature")


@dataclass(frozen=True)
class PaperFigures:
    """A model's figures as printed in a paper; ``None`` where it has none.

    Attributes:
        params: parameter count.
        madds: multiply-adds per image (224×224 for the ImageNet models).
        top1: top-1 accuracy in percent on the source's dataset (ImageNet for the 2-D models).
        source: where the figures come from, and on which dataset.
    """

    params: int | None = None
    madds: int | None = None
    top1: float | None = None
    source: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of one registered model.

    Attributes:
        name: registry name, e.g. ``"dy_resnet18"``.
        builder: the keyword-only function that builds it.
        dynamic: whether its convolutions (all but the stem and those documented) are dynamic.
        twin: the name of the same architecture with the other kind of convolution.
        input_size: the input ``(1, C, *spatial)`` at which the README and ``dyconv models`` profile it.
        num_classes: the classifier size of that reference configuration (ImageNet: 1000; MNIST-1D: 10).
        paper: the paper's figures for this model, or ``None``.
        trained_by: the exact command that trained the published checkpoint; ``None``: no checkpoint yet.
        checkpoint: file name of that checkpoint; ``None``: none yet.
    """

    name: str
    builder: Callable[..., nn.Module]
    dynamic: bool
    twin: str
    input_size: tuple[int, ...]
    num_classes: int = 1000
    paper: PaperFigures | None = None
    trained_by: str | None = None
    checkpoint: str | None = None

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options the builder accepts."""
        return tuple(inspect.signature(self.builder).parameters)


_MODELS: dict[str, ModelInfo] = {}


def register_model(*, twin: str, input_size: tuple[int, ...] = (1, 3, 224, 224), num_classes: int = 1000,
                   paper: PaperFigures | None = None):
    """Decorator registering a builder under its function name.

    Example:
        >>> @register_model(twin="dy_tiny")
        ... def tiny(*, num_classes=1000, in_channels=3, small_input=False):
        ...     return nn.Linear(in_channels, num_classes)
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _MODELS:
            raise ValueError(f"a model named {name!r} is already registered")
        dynamic = "num_experts" in inspect.signature(builder).parameters
        _MODELS[name] = ModelInfo(name, builder, dynamic, twin, tuple(input_size), num_classes, paper)
        return builder

    return decorate


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching the shell-style ``pattern`` (``fnmatch``).

    Example:
        >>> list_models("dy_mobilenetv2_*")
        ['dy_mobilenetv2_035', 'dy_mobilenetv2_050', 'dy_mobilenetv2_075', 'dy_mobilenetv2_100']
    """
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string. Received: pattern={pattern!r}")
    return sorted(name for name in _MODELS if fnmatch.fnmatchcase(name, pattern))


def model_info(name: str) -> ModelInfo:
    """The metadata of the registered model ``name``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model name. Received: name={name!r}; known: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, *, num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with freshly initialised weights.

    Args:
        name: a name from :func:`list_models`.
        num_classes: size of the classifier's output.
        in_channels: channels of the input (1 for grey images, 3 for RGB).
        **kwargs: the model's options. Every model takes ``small_input`` (see the model's builder for exactly
            what it changes). Dynamic (``dy_``) models also take ``num_experts`` (K, default 4),
            ``reduction`` (attention hidden width ``in_channels // reduction``, default 4) and ``temperature``
            (initial softmax temperature, default 30).

    Raises:
        ValueError: unknown ``name``.
        TypeError: an option the model does not take (dynamic options given to a static model included).

    Example:
        >>> model = create_model("dy_resnet18", num_classes=10, in_channels=1, small_input=True, num_experts=4)
        >>> model(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    info = model_info(name)
    accepted = info.options
    unknown = sorted(key for key in kwargs if key not in accepted)
    if unknown:
        dynamic_only = [key for key in unknown if key in DYNAMIC_OPTIONS]
        received = ", ".join(f"{key}={kwargs[key]!r}" for key in unknown)
        if dynamic_only and not info.dynamic:
            raise TypeError(
                f"{name!r} is a static model; {', '.join(dynamic_only)} only apply to its dynamic twin "
                f"{info.twin!r}. Received: {received}"
            )
        options = [key for key in accepted if key not in ("num_classes", "in_channels")]
        raise TypeError(f"{name!r} does not take {', '.join(unknown)} (its options: {', '.join(options)}). "
                        f"Received: {received}")
    return info.builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
