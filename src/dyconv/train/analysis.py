"""What the attention does: per-layer entropy and per-class mean attention, and "attention off" evaluation.

The paper (section 5) examines whether the attention is input-dependent: low entropy and class-specific
mixtures in the deep layers mean the K kernels are really used dynamically. ``uniform_attention`` replaces
every attention by 1/K, which is the same as convolving with the plain average of the K kernels.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..temperature import dynamic_layers


def _named_dynamic_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = set(map(id, dynamic_layers(model)))
    return [(name, m) for name, m in model.named_modules() if id(m) in layers]


@contextlib.contextmanager
def uniform_attention(model: nn.Module) -> Iterator[int]:
    """Within the block, every dynamic layer of ``model`` mixes its K experts with weight 1/K (experts averaged).

    Yields the number of layers affected. Implemented as forward hooks on the routers that return zero
    logits, so that softmax gives exactly 1/K whatever the temperature.
    """
    handles = [m.router.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
               for _, m in _named_dynamic_layers(model)]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def attention_statistics(model: nn.Module, batches: Iterable, num_classes: int, device: torch.device | str = "cpu"
                         ) -> dict:
    """Attention of every dynamic layer over ``batches`` (``(x, y)`` pairs), with the model in eval mode.

    Returns a JSON-serialisable dict: ``layers``: list of ``{"name", "num_experts", "entropy" (mean over
    samples, nats), "normalized_entropy" (÷ log K: 1 = uniform, 0 = one-hot), "per_class" (num_classes × K
    mean attention), "mean" (K)}`` in network order, and ``samples``.
    """
    named = _named_dynamic_layers(model)
    if not named:
        return {"layers": [], "samples": 0}
    current: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in named:
        def hook(mod, inp, out, name=name, layer=layer):
            current[name] = torch.softmax(out.float() / layer.temperature.float(), dim=1)
        handles.append(layer.router.register_forward_hook(hook))
    sums = {name: torch.zeros(num_classes, layer.num_experts, dtype=torch.float64) for name, layer in named}
    entropy = {name: 0.0 for name, _ in named}
    counts = torch.zeros(num_classes, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            current.clear()
            model(x.to(device))
            y = y.cpu()
            counts += torch.bincount(y, minlength=num_classes).double()
            for name, _ in named:
                a = current[name].cpu().double()
                sums[name].index_add_(0, y, a)
                entropy[name] += float(-(a * a.clamp_min(1e-12).log()).sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n = float(counts.sum())
    out = []
    for name, layer in named:
        k = layer.num_experts
        per_class = (sums[name] / counts.clamp_min(1)[:, None]).tolist()
        mean_entropy = entropy[name] / max(n, 1.0)
        out.append({"name": name, "num_experts": k, "entropy": mean_entropy,
                    "normalized_entropy": mean_entropy / math.log(k) if k > 1 else 0.0,
                    "per_class": per_class, "mean": (sums[name].sum(0) / max(n, 1.0)).tolist()})
    return {"layers": out, "samples": int(n)}
