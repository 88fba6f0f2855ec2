"""The size table of the registered models (what ``dyconv models`` prints), with the paper's figures beside ours."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..profile import Profile, profile
from ._registry import ModelInfo, create_model, list_models, model_info


@dataclass(frozen=True)
class ModelRow:
    """One model's measured size next to its metadata."""

    info: ModelInfo
    profile: Profile


def model_table(pattern: str = "*") -> list[ModelRow]:
    """Build every registered model matching ``pattern`` in its reference configuration and profile it.

    The reference configuration is the registry's ``input_size`` (batch 1; 3×224×224 for the ImageNet
    models, 1×40 for the MNIST-1D pair) and ``num_classes``, default options otherwise (K = 4, reduction 4).
    The models are built on PyTorch's ``meta`` device: the counts depend only on shapes, and nothing is
    allocated or initialised (``tests/test_profile.py`` checks that meta and CPU give the same profile).

    Example:
        >>> [row.profile.params for row in model_table("resnet10")]
        [5418792]
    """
    rows = []
    # each static model followed by its dynamic twin
    for name in sorted(list_models(pattern), key=lambda n: (n.removeprefix("dy_"), n.startswith("dy_"))):
        info = model_info(name)
        with torch.device("meta"):
            model = create_model(name, num_classes=info.num_classes, in_channels=info.input_size[1])
        rows.append(ModelRow(info, profile(model, info.input_size)))
    return rows


def _count(value: int | None) -> str:
    if value is None:
        return ""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return str(value)


def _delta(ours: int, paper: int | None) -> str:
    return "" if paper is None else f"{100.0 * (ours - paper) / paper:+.1f}%"


def format_table(rows: list[ModelRow]) -> str:
    """The rows as a Markdown table: params and MAdds, the paper's figures and our difference to them."""
    header = ("| model | input | params | paper | Δ | MAdds | paper | Δ | DY overhead MAdds (attention + mixing) "
              "| paper top-1 % |")
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        p, paper = row.profile, row.info.paper
        overhead = ""
        if p.dynamic_layers:
            overhead = f"{_count(p.overhead_madds)} ({_count(p.attention_madds)} + " \
                       f"{_count(p.mixing_madds)})"
        top1 = "" if paper is None or paper.top1 is None else f"{paper.top1:.1f}"
        lines.append(
            f"| {row.info.name} | {'×'.join(str(n) for n in p.input_size)} | {_count(p.params)} "
            f"| {_count(paper and paper.params)} | {_delta(p.params, paper and paper.params)} "
            f"| {_count(p.madds)} | {_count(paper and paper.madds)} "
            f"| {_delta(p.madds, paper and paper.madds)} | {overhead} | {top1} |"
        )
    return "\n".join(lines)
