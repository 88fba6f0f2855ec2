"""Upcycling: turn the convolutions of any CNN into dynamic ones, exact at initialisation, and back.

:func:`convert` replaces the eligible ``nn.Conv1d/2d/3d`` of a model by :class:`dyconv.DynamicConv1d/2d/3d`
with the same arguments and, with ``init="copy"``, every expert equal to the original kernel. The
attention sums to one per sample, so the mixed kernel ``sum_k pi_k W`` is ``W`` and the converted model
computes what the original computed (up to float rounding), in train and eval mode, whatever the
router's weights. :func:`convert_report` says what :func:`convert` would do; :func:`average_experts`
goes back: each dynamic layer becomes a static convolution whose kernel is the mean of its experts
(the paper's "attention off" ablation).

Which convolutions are converted:

1. Candidates are the modules that are instances of ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``.
2. Only those matched by ``include`` (default: all), minus those matched by ``exclude``.
3. The stem, i.e. the first candidate in ``model.named_modules()`` order (the order in which the
   modules were assigned, which for the usual CNNs is the first convolution applied), stays static
   unless ``convert_stem=True``, as in the paper.
4. A convolution is converted only if the dynamic layer provably computes the same thing: its class is
   ``nn.ConvNd`` itself or a subclass that keeps ``nn.ConvNd``'s ``forward`` and ``_conv_forward``
   (e.g. torchvision's ``Conv3DSimple``), it has no forward hooks, no parametrization and no lazy
   (uninitialised) weight. timm's ``Conv2dSame`` (TensorFlow "SAME" padding computed from the input size)
   is converted to :class:`DynamicConv2dSame`, which pads the same way. Any other subclass with its own
   ``forward`` (timm's ``StdConv2d``, ``ScaledStdConv2d``, ``Conv2dSameExport``, quantisation-aware convs,
   ...) is left static and listed in the report with the reason, never converted into something that
   computes differently. Transposed convolutions are not ``nn.ConvNd`` subclasses; they are listed as
   skipped too.
"""

from __future__ import annotations

import copy
import fnmatch
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import List, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from . import _args
from .functional import dynamic_conv
from .layers import DYNAMIC_CONV_TYPES, DynamicConv1d, DynamicConv2d, DynamicConv3d

#: A module selector: a qualified module name, a glob pattern, a list of them, or ``(name, module) -> bool``.
Selector = Union[str, Iterable[str], Callable[[str, nn.Module], bool], None]

STATIC_TO_DYNAMIC = {nn.Conv1d: DynamicConv1d, nn.Conv2d: DynamicConv2d, nn.Conv3d: DynamicConv3d}
INITS = ("copy", "fresh")


def tf_same_padding(size: int, kernel_size: int, stride: int, dilation: int) -> Tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one spatial dimension of length ``size``.

    The output has ``ceil(size / stride)`` positions; the padding that needs is split with the odd
    element after. Unlike PyTorch's ``padding='same'`` it depends on the input size when ``stride > 1``.

    >>> tf_same_padding(7, 3, 2, 1)
    (1, 1)
    >>> tf_same_padding(8, 3, 2, 1)
    (0, 1)
    """
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class DynamicConv2dSame(DynamicConv2d):
    """:class:`dyconv.DynamicConv2d` with TensorFlow "SAME" zero padding computed from each input's size.

    The dynamic counterpart of timm's ``Conv2dSame`` (used by its ``tf_*`` models): each spatial
    dimension is padded by :func:`tf_same_padding`, then convolved. :func:`convert` creates it (with
    ``padding=0``); import it from ``dyconv.convert``. TorchScript-compatible.

    Example:
        >>> layer = DynamicConv2dSame(4, 8, 3, stride=2)
        >>> layer(torch.randn(2, 4, 9, 8)).shape
        torch.Size([2, 8, 5, 4])
    """

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x, allow_unbatched=True)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        padding: List[int] = []  # (before, after) per spatial dimension, in dimension order
        for axis in range(2):
            before, after = tf_same_padding(x.shape[axis + 2], self.kernel_size[axis], self.stride[axis],
                                            self.dilation[axis])
            padding.append(before + self._padding_pairs[2 * axis])
            padding.append(after + self._padding_pairs[2 * axis + 1])
        out = dynamic_conv(x, self.weight, self.bias, self.attention(x), self.stride, padding, self.dilation,
                           self.groups, self.padding_mode, self.strategy)
        if unbatched:
            out = out.squeeze(0)
        return out


def _timm_conv2d_same() -> type | None:
    # Only a model built by timm can hold timm's class, so look it up without importing timm.
    module = sys.modules.get("timm.layers.conv2d_same")
    return getattr(module, "Conv2dSame", None)


def _static_base(module: nn.Module) -> type | None:
    for base in STATIC_TO_DYNAMIC:
        if isinstance(module, base):
            return base
    return None


def _skip_reason(module: nn.Module) -> str | None:
    """Why ``module`` (an ``nn.ConvNd`` instance) cannot be converted exactly, or ``None`` if it can."""
    base = _static_base(module)
    cls = type(module)
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy convolution with uninitialised weight (run one forward pass first)"
    if parametrize.is_parametrized(module):
        return "parametrized weight (torch.nn.utils.parametrize); the dynamic layer would drop the parametrization"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return ("has hooks (e.g. the old weight_norm/spectral_norm, or user hooks) that the dynamic layer would not "
                "reproduce")
    if cls is _timm_conv2d_same():
        return None
    if cls.forward is not base.forward or cls._conv_forward is not base._conv_forward:
        return (f"{cls.__module__}.{cls.__qualname__} overrides {base.__name__}'s forward, so a dynamic layer "
                "would compute something else; left static")
    return None


def _as_matcher(selector: Selector, argument: str, model: nn.Module) -> Callable[[str, nn.Module], bool]:
    if callable(selector) and not isinstance(selector, nn.Module):
        return selector
    if isinstance(selector, str):
        patterns = [selector]
    elif isinstance(selector, Iterable) and not isinstance(selector, nn.Module):
        patterns = list(selector)
        bad = [p for p in patterns if not isinstance(p, str)]
        if bad:
            raise TypeError(f"{argument} must hold module names or glob patterns (str). "
                            f"Received: {argument}={selector!r}")
    else:
        raise TypeError(
            f"{argument} must be a module name, a glob pattern, a list of them or a predicate (name, module) -> bool. "
            f"Received: {argument}={selector!r}"
        )

    def matches(pattern: str, name: str) -> bool:
        # a container's name selects every convolution inside it ("layer4" covers "layer4.0.conv1")
        return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")

    names = [name for name, _ in model.named_modules()]
    for pattern in patterns:
        if not any(matches(pattern, name) for name in names):
            raise ValueError(f"{argument} pattern {pattern!r} matches no module of the model. Received: "
                             f"{argument}={selector!r}")
    return lambda name, module: any(matches(p, name) for p in patterns)


@dataclass
class ConversionReport:
    """What :func:`convert` did (or would do) to a model.

    Attributes:
        converted: qualified names of the convolutions replaced by dynamic ones, in module order.
        skipped: qualified name -> reason, for every convolution (transposed ones included) left static.
        params_before: parameters of the original model.
        params_after: parameters of the converted model (experts, biases and attention branches included).
    """

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} convolution(s), skipped {len(self.skipped)}; "
                 f"parameters {self.params_before:,} -> {self.params_after:,} "
                 f"({self.params_after / max(self.params_before, 1):.2f}x)"]
        lines += [f"  converted  {name}" for name in self.converted]
        lines += [f"  skipped    {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _plan(model: nn.Module, include: Selector, exclude: Selector, convert_stem: bool):
    """The convolutions to convert ``[(name, module)]`` and ``{name: reason}`` for those left static."""
    included = _as_matcher(include, "include", model) if include is not None else None
    excluded = _as_matcher(exclude, "exclude", model) if exclude is not None else None
    chosen: list[tuple[str, nn.Module]] = []
    skipped: dict[str, str] = {}
    stem_seen = False
    for name, module in model.named_modules():
        if not isinstance(module, _ConvNd):
            continue
        base = _static_base(module)
        if base is None:
            skipped[name] = (f"{type(module).__name__} is not an nn.Conv1d/2d/3d (transposed convolutions are not "
                             "converted)")
            continue
        is_stem = not stem_seen
        stem_seen = True
        if is_stem and not convert_stem:
            skipped[name] = "stem (the first convolution) stays static; pass convert_stem=True to convert it"
        elif included is not None and not included(name, module):
            skipped[name] = "not selected by include"
        elif excluded is not None and excluded(name, module):
            skipped[name] = "selected by exclude"
        else:
            reason = _skip_reason(module)
            if reason is None:
                chosen.append((name, module))
            else:
                skipped[name] = reason
    return chosen, skipped


def _count(model: nn.Module) -> int:
    # a lazy module's parameters have no size yet
    return sum(p.numel() for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter))


def _dynamic_param_count(conv: _ConvNd, num_experts: int, reduction: int) -> int:
    kernel = conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
    hidden = _args.attention_hidden(conv.in_channels, reduction)
    router = conv.in_channels * hidden + hidden + hidden * num_experts + num_experts
    return num_experts * kernel + router


def _to_dynamic(conv: _ConvNd, num_experts: int, reduction: int, temperature: float, init: str,
                noise_std: float) -> nn.Module:
    weight = conv.weight
    same = type(conv) is _timm_conv2d_same()
    cls = DynamicConv2dSame if same else STATIC_TO_DYNAMIC[_static_base(conv)]
    layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0 if same else conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device=weight.device,
                dtype=weight.dtype, num_experts=num_experts, reduction=reduction, temperature=temperature)
    if init == "copy":
        with torch.no_grad():
            layer.weight.copy_(weight.unsqueeze(0).expand_as(layer.weight))
            if noise_std > 0:
                noise = torch.randn_like(layer.weight)
                # centred over the experts, so their mean (and the output at uniform attention) stays the original
                noise -= noise.mean(0, keepdim=True)
                layer.weight.add_(noise * (noise_std * weight.std(correction=0)))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.unsqueeze(0).expand_as(layer.bias))
    # a frozen kernel stays frozen; the new attention branch is trainable
    layer.weight.requires_grad_(weight.requires_grad)
    if conv.bias is not None:
        layer.bias.requires_grad_(conv.bias.requires_grad)
    layer.train(conv.training)
    return layer


def _replace(model: nn.Module, new: dict[int, nn.Module]) -> nn.Module:
    """Swap every occurrence of the modules keyed by ``id`` (a module shared by two parents is swapped in both)."""
    if id(model) in new:
        return new[id(model)]
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                parent._modules[child_name] = new[id(child)]
    return model


def _check_options(num_experts, reduction, temperature, init, noise_std) -> None:
    _args.positive_int(num_experts, "num_experts")
    _args.positive_int(reduction, "reduction")
    _args.positive_float(temperature, "temperature")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}. Received: init={init!r}")
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not noise_std >= 0:
        raise ValueError(f"noise_std must be a non-negative number. Received: noise_std={noise_std!r}")
    if noise_std > 0 and init != "copy":
        raise ValueError(f"noise_std only applies to init='copy'. Received: init={init!r}, noise_std={noise_std!r}")


def convert(model: nn.Module, *, num_experts: int = 4, reduction: int = 4, temperature: float = 30.0,
            init: str = "copy", noise_std: float = 0.0, exclude: Selector = None, include: Selector = None,
            convert_stem: bool = False, inplace: bool = False, return_report: bool = False):
    """Replace the convolutions of ``model`` by dynamic ones (upcycling a static CNN).

    Every convolution selected by the rules of :mod:`dyconv.convert` (by default all but the stem)
    becomes the matching :class:`dyconv.DynamicConv1d/2d/3d` under the same name, with the same
    ``in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode``,
    training mode, device and dtype. The original model is left untouched unless ``inplace=True``.

    Args:
        model: any ``nn.Module``.
        num_experts, reduction, temperature: the dynamic layers' options (K, attention reduction, τ).
        init: ``"copy"``: every expert is the original kernel (and bias), so the converted model
            computes what the original computed, in train and eval mode. ``"fresh"``: every expert
            initialised independently (the layer's ``reset_parameters``), like training from scratch.
        noise_std: with ``init="copy"``, add Gaussian noise of this standard deviation, relative to the
            standard deviation of each original kernel's entries, to the experts (centred over the
            experts, so their mean stays the original kernel; biases are copied exactly). With
            ``noise_std=0`` the experts are identical and the routers' gradient is exactly zero until
            the first update makes the experts differ; a small value (e.g. 0.01) breaks that symmetry
            at once, at the price of outputs that are no longer exactly the original's.
        exclude, include: which convolutions to leave static / to consider at all. Each is a qualified
            module name (a container's name covers every convolution inside it), a glob pattern matched
            with ``fnmatch`` against qualified names (``"layer4.*.conv2"``), a list of these, or a
            predicate ``(name, module) -> bool``. A name or pattern that matches no module is an error.
        convert_stem: also convert the first convolution (the stem); the paper keeps it static.
        inplace: modify ``model`` itself instead of a deep copy.
        return_report: also return a :class:`ConversionReport`.

    Returns:
        the converted model, or ``(model, report)`` when ``return_report=True``.

    Example:
        >>> net = torchvision.models.resnet18(weights="IMAGENET1K_V1").eval()
        >>> dy = dyconv.convert(net)                      # 19 of 20 convolutions now dynamic, K = 4
        >>> torch.allclose(dy(x), net(x), rtol=1e-4, atol=1e-5)
        True
    """
    _check_options(num_experts, reduction, temperature, init, noise_std)
    params_before = _count(model)
    chosen, skipped = _plan(model, include, exclude, convert_stem)  # before copying: bad selectors fail fast
    if not inplace:
        memo: dict[int, object] = {}
        model = copy.deepcopy(model, memo)
        chosen = [(name, memo[id(conv)]) for name, conv in chosen]
    new = {id(conv): _to_dynamic(conv, num_experts, reduction, temperature, init, noise_std) for _, conv in chosen}
    model = _replace(model, new)
    if not return_report:
        return model
    report = ConversionReport([name for name, _ in chosen], skipped, params_before, _count(model))
    return model, report


def convert_report(model: nn.Module, *, num_experts: int = 4, reduction: int = 4, exclude: Selector = None,
                   include: Selector = None, convert_stem: bool = False) -> ConversionReport:
    """What :func:`convert` with these options would do, without converting anything.

    Returns a :class:`ConversionReport`: the names that would be converted, the names left static
    with the reason, and the parameter counts before and after (computed from the shapes).

    Example:
        >>> print(dyconv.convert_report(torchvision.models.resnet18()))
        converted 19 convolution(s), skipped 1; parameters 11,689,512 -> 45,472,052 (3.89x)
        ...
    """
    _args.positive_int(num_experts, "num_experts")
    _args.positive_int(reduction, "reduction")
    chosen, skipped = _plan(model, include, exclude, convert_stem)
    params_before = _count(model)
    extra = 0
    seen: set[int] = set()
    for _, conv in chosen:
        if id(conv) not in seen:  # a shared convolution is one layer
            seen.add(id(conv))
            extra += _dynamic_param_count(conv, num_experts, reduction) - sum(p.numel() for p in conv.parameters())
    return ConversionReport([name for name, _ in chosen], skipped, params_before, params_before + extra)


def _to_static(layer: nn.Module) -> nn.Module:
    weight = layer.weight
    if isinstance(layer, DynamicConv2dSame):
        from timm.layers import Conv2dSame  # only models converted from timm's Conv2dSame hold this layer

        conv = Conv2dSame(layer.in_channels, layer.out_channels, layer.kernel_size, tuple(layer.stride), 0,
                          tuple(layer.dilation), layer.groups, layer.bias is not None, device=weight.device,
                          dtype=weight.dtype)
    else:
        cls = {DynamicConv1d: nn.Conv1d, DynamicConv2d: nn.Conv2d, DynamicConv3d: nn.Conv3d}[type(layer)]
        conv = cls(layer.in_channels, layer.out_channels, layer.kernel_size, tuple(layer.stride), layer.padding,
                   tuple(layer.dilation), layer.groups, layer.bias is not None, layer.padding_mode,
                   device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.mean(0))
        if layer.bias is not None:
            conv.bias.copy_(layer.bias.mean(0))
    conv.weight.requires_grad_(weight.requires_grad)
    if layer.bias is not None:
        conv.bias.requires_grad_(layer.bias.requires_grad)
    conv.train(layer.training)
    return conv


def average_experts(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every dynamic layer by a static convolution whose kernel and bias are the mean of its experts.

    The paper's "attention off" ablation (every attention replaced by the uniform 1/K). For a model
    made by ``convert(..., init="copy")`` and not yet trained, this gives back the original model's
    outputs. Returns the new model; ``model`` is left untouched unless ``inplace=True``.

    Example:
        >>> static = dyconv.average_experts(dyconv.convert(net))
        >>> any(isinstance(m, dyconv.DynamicConv2d) for m in static.modules())
        False
    """
    if not inplace:
        model = copy.deepcopy(model)
    new = {id(m): _to_static(m) for m in model.modules() if isinstance(m, DYNAMIC_CONV_TYPES)}
    return _replace(model, new)
