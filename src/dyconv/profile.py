"""Parameters and multiply-adds of a model, with the dynamic convolutions' overhead shown separately.

Every count of operations comes from PyTorch's own ``torch.utils.flop_counter.FlopCounterMode``, which
sees what the model actually executes (including the custom dynamic layers); MAdds = FLOPs / 2. The
counter counts matrix products and convolutions only: poolings, normalisations, activations, additions
and the softmax are not in the figures (as in the papers' MAdds).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .functional import apply_padding
from .layers import DYNAMIC_CONV_TYPES


@dataclass(frozen=True)
class Profile:
    """Size and cost of a model for one input size.

    Attributes:
        input_size: the input shape profiled, batch included.
        params: number of parameters (shared ones once).
        madds: multiply-adds of one forward pass, everything included.
        dynamic_layers: number of dynamic convolution layers.
        attention_params: parameters of their attention branches (included in ``params``).
        attention_madds: MAdds of their attention branches (the two linear layers; the pool is not counted).
        mixing_madds: the rest of what the dynamic layers cost beyond the static convolution of the same
            shape: aggregating the K kernels and biases per sample (K × kernel size MAdds per layer and
            sample, with the default strategies).
    """

    input_size: tuple[int, ...]
    params: int
    madds: int
    dynamic_layers: int = 0
    attention_params: int = 0
    attention_madds: int = 0
    mixing_madds: int = 0

    @property
    def overhead_madds(self) -> int:
        """What dynamic convolution adds to the MAdds: attention plus kernel mixing."""
        return self.attention_madds + self.mixing_madds

    @property
    def static_madds(self) -> int:
        """The MAdds of the same network with every dynamic layer counted as the static convolution it computes."""
        return self.madds - self.overhead_madds

    def __str__(self) -> str:
        text = f"input {tuple(self.input_size)}: {self.params / 1e6:.2f}M params, {self.madds / 1e6:.1f}M MAdds"
        if self.dynamic_layers:
            text += (f" ({self.dynamic_layers} dynamic layers: attention {self.attention_madds / 1e6:.2f}M + "
                     f"mixing {self.mixing_madds / 1e6:.2f}M MAdds, attention {self.attention_params / 1e6:.2f}M "
                     "params)")
        return text


def count_madds(fn: Callable[[], object]) -> int:
    """Multiply-adds of running ``fn()``, from ``FlopCounterMode`` (FLOPs / 2).

    Example:
        >>> count_madds(lambda: torch.randn(2, 3) @ torch.randn(3, 4))
        24
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def _static_equivalent_madds(layer: nn.Module, input_shape: Sequence[int]) -> int:
    """MAdds of the one-kernel convolution a dynamic layer computes, counted on shape-only (meta) tensors."""
    x = torch.empty(input_shape, device="meta")
    weight = torch.empty(layer.weight.shape[1:], device="meta")
    conv = getattr(F, f"conv{layer._rank}d")

    def run():
        padded, padding = apply_padding(x, layer._padding_pairs, layer.padding_mode)
        conv(padded, weight, None, layer.stride, padding, layer.dilation, layer.groups)

    return count_madds(run)


def profile(model: nn.Module, input_size: Sequence[int]) -> Profile:
    """Count a model's parameters and MAdds on a zero input of ``input_size``, in eval mode, without gradients.

    The papers' MAdds are per image, so profile at batch 1 (``input_size=(1, 3, 224, 224)``); at batch B
    every MAdds figure is B times larger. The model's train/eval flags are restored afterwards. The input is
    created with the dtype and on the device of the model's first parameter (a model built on the ``meta``
    device is counted without allocating anything).

    How the overhead is separated: one forward pass runs under ``FlopCounterMode``, which also reports the
    operations of every submodule. For each dynamic layer, its attention branch (``router``) is the attention
    cost; the layer's total minus the attention and minus the one-kernel convolution of the same shape
    (counted on its own) is the mixing cost.

    Args:
        model: any ``nn.Module`` taking one tensor.
        input_size: the full input shape, batch first, e.g. ``(1, 3, 224, 224)``.

    Returns:
        A :class:`Profile`; ``madds`` includes the dynamic overhead, which is also given on its own
        (``attention_madds``, ``mixing_madds``, ``overhead_madds``).

    Example:
        >>> p = profile(nn.Conv2d(3, 8, 3, padding=1), (1, 3, 32, 32))
        >>> p.params, p.madds   # 8*3*3*3 + 8; 32*32 outputs * 8 channels * 27 taps
        (224, 221184)
    """
    size = tuple(input_size)
    if len(size) < 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size):
        raise ValueError(f"input_size must be the full input shape (batch, channels, *spatial) of positive ints. "
                         f"Received: input_size={input_size!r}")
    first = next(iter(model.parameters()), None)
    factory = {"dtype": first.dtype, "device": first.device} if first is not None else {}
    x = torch.zeros(size, **factory)

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, DYNAMIC_CONV_TYPES)]
    shapes: dict[int, list[tuple[int, ...]]] = {id(m): [] for _, m in layers}

    def record(module, args):
        inp = args[0]
        shapes[id(module)].append(tuple(inp.shape) if inp.dim() == module._rank + 2 else (1, *inp.shape))

    hooks = [m.register_forward_pre_hook(record) for _, m in layers]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes:
            m.training = training
    by_module = counter.get_flop_counts()
    root = type(model).__name__

    def module_madds(name: str) -> int:
        return sum(by_module.get(f"{root}.{name}" if name else root, {}).values()) // 2

    attention = mixing = 0
    for name, m in layers:
        if not shapes[id(m)]:
            continue  # not called in this forward pass
        total = module_madds(name)
        if total == 0:
            raise RuntimeError(f"FlopCounterMode reported nothing for the dynamic layer {name!r}; this version of "
                               "PyTorch names modules differently, so the overhead cannot be separated")
        routed = module_madds(f"{name}.router" if name else "router")
        attention += routed
        mixing += total - routed - sum(_static_equivalent_madds(m, shape) for shape in shapes[id(m)])
    return Profile(
        input_size=size,
        params=sum(p.numel() for p in model.parameters()),
        madds=counter.get_total_flops() // 2,
        dynamic_layers=len(layers),
        attention_params=sum(p.numel() for _, m in layers for p in m.router.parameters()),
        attention_madds=attention,
        mixing_madds=mixing,
    )
