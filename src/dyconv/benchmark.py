"""Speed and training memory of dynamic convolution against static convolution.

:func:`run_benchmark` measures, for a fixed list of layer shapes and for DY-ResNet-18 / DY-MobileNetV2 ×1.0
against torchvision's static ``resnet18`` / ``mobilenet_v2``:

- batch-1 inference at 224², batch-32 inference at 224², a batch-32 training step at 112²
  (forward, loss, backward; for networks also an SGD step), each as a ratio of medians to static;
- the peak memory of that training step as a ratio to static;
- the same for :class:`NaiveDynamicConv2d`, the batch-as-groups implementation most public code copies.

Method. The sides of a comparison run interleaved (static, dyconv, naive, static, ...), so a slow spell of a
shared machine hits all of them alike, and each figure is the median over the repeats. The static side and the
dyconv side each run every figure in their faster memory format for it (contiguous or channels_last: every format
of every side is timed in the same interleaved rounds and the faster median counts, the format is reported; one
copy of the model per format, so nothing is converted between timed calls); the naive side runs contiguous, as
written by its authors. Peak training memory on the CPU is read from PyTorch's own allocator events
(``torch.profiler`` with ``profile_memory=True``): the bytes held by the blocks that one training step allocates,
each from its allocation until its free, at their maximum (on CUDA the caching allocator's peak statistic); it
counts the activations kept for backward, the temporaries and the gradients allocated by the step, not the
parameters and optimizer state that exist before it (memory that existed before the step and is freed by it is not
subtracted). Layer rows train at half the listed
spatial size, where the layer sits in a network fed 112² images. The minor page faults of every timed call are
counted too (medians per side and figure, printed after the table and written with the rows), and the variables
that configure the allocator are recorded with the results: on a machine that maps fresh pages slowly they are a
large share of both sides' figures (README, "Page faults").

The DY networks are ``dyconv.convert(torchvision model, init="fresh")``: every convolution but the stem
becomes a :class:`dyconv.DynamicConv2d` with the torchvision shapes (K = 4).

Example:
    >>> from dyconv.benchmark import LayerShape, run_benchmark
    >>> rows = run_benchmark(layers=[LayerShape("tiny", 4, 4, 3, 8)], networks=[], batch_size=2, repeats=1,
    ...                      verbose=False)
    >>> sorted(rows[0])[:3]
    ['b1_ratio', 'b1_static_ms', 'batch_ratio']
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _cpu_kernel
from .layers import DynamicConv2d

try:
    import resource  # page fault counts (Unix)
except ImportError:
    resource = None

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass(frozen=True)
class LayerShape:
    """One convolution to benchmark: its ``nn.Conv2d`` arguments and the spatial size it sees at 224² input."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    size: int
    groups: int = 1
    stride: int = 1

    def conv(self, layer_type: type = nn.Conv2d, **kwargs) -> nn.Module:
        return layer_type(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                          self.kernel_size // 2, groups=self.groups, bias=False, **kwargs)


# ResNet-18's 3x3 stages (56², 14², 7²) and MobileNetV2's depthwise and pointwise convolutions.
LAYER_SHAPES = (
    LayerShape("3x3 64->64 @56", 64, 64, 3, 56),
    LayerShape("3x3 256->256 @14", 256, 256, 3, 14),
    LayerShape("3x3 512->512 @7", 512, 512, 3, 7),
    LayerShape("dw3x3 144 @56", 144, 144, 3, 56, groups=144),
    LayerShape("dw3x3 576 @14", 576, 576, 3, 14, groups=576),
    LayerShape("1x1 expand 24->144 @56", 24, 144, 1, 56),
    LayerShape("1x1 project 144->24 @56", 144, 24, 1, 56),
    LayerShape("1x1 expand 96->576 @14", 96, 576, 1, 14),
    LayerShape("1x1 project 576->96 @14", 576, 96, 1, 14),
)
NETWORKS = ("resnet18", "mobilenet_v2")


def dense_layer_shapes(parts: Sequence[str]) -> list[LayerShape]:
    """The layer shapes whose names contain one of ``parts`` among the bench's ungrouped stride-1 layers with kernels
    larger than 1×1 (the shapes the compiled dense kernel takes at every output size up to 196 positions)."""
    return [s for s in LAYER_SHAPES if any(part in s.name for part in parts) and s.groups == 1 and s.stride == 1
            and s.kernel_size > 1]


def dense_benchmark_shapes(parser: argparse.ArgumentParser, parts: Sequence[str]) -> list[LayerShape]:
    """:func:`dense_layer_shapes` for a benchmark of the compiled dense kernel: exits (``SystemExit``) where the kernel
    is not available, and through ``parser.error`` where no shape matches ``parts``."""
    if not _cpu_kernel.available():
        raise SystemExit(f"the compiled CPU kernel is not available: {_cpu_kernel.unavailable_reason()}")
    shapes = dense_layer_shapes(parts)
    if not shapes:
        parser.error(f"--layers matches no ungrouped stride-1 3x3 layer shape of the bench. Received: {list(parts)}")
    return shapes


class NaiveDynamicConv2d(nn.Module):
    """The dynamic convolution of most public code: one ``mm`` mixes the kernels, batch folded into groups.

    Shares the parameters and the attention of ``layer`` (a :class:`dyconv.DynamicConv2d` with zero
    padding mode), so it computes the same numbers; autograd keeps every sample's mixed kernel for
    backward. Kept here only as the baseline the benchmark compares against.

    Shape:
        ``(B, C_in, H, W)`` → ``(B, C_out, H_out, W_out)``.
    """

    def __init__(self, layer: DynamicConv2d):
        super().__init__()
        if layer.padding_mode != "zeros":
            raise ValueError(f"NaiveDynamicConv2d needs padding_mode='zeros'. Received: {layer.padding_mode!r}")
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        batch, _, height, width = x.shape
        attention = layer.attention(x)
        k = layer.num_experts
        weight = torch.mm(attention, layer.weight.reshape(k, -1))
        weight = weight.reshape(batch * layer.out_channels, *layer.weight.shape[2:])
        bias = torch.mm(attention, layer.bias).reshape(-1) if layer.bias is not None else None
        pad = layer._padding_pairs
        out = F.conv2d(x.reshape(1, -1, height, width), weight, bias, layer.stride, [pad[0], pad[2]],
                       layer.dilation, layer.groups * batch)
        return out.reshape(batch, layer.out_channels, *out.shape[2:])


def naive_model(model: nn.Module) -> nn.Module:
    """``model`` with every :class:`DynamicConv2d` wrapped in a :class:`NaiveDynamicConv2d` (in place)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DynamicConv2d):
                setattr(parent, name, NaiveDynamicConv2d(child))
    return model


def build_network(name: str) -> tuple[nn.Module, nn.Module]:
    """``(static torchvision model, DY model)`` for ``name`` in :data:`NETWORKS`, freshly initialised."""
    import torchvision

    from .convert import convert

    if name not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}. Received: {name!r}")
    static = getattr(torchvision.models, name)(weights=None)
    return static, convert(static, init="fresh")


def peak_training_memory(step: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated above the starting level while ``step()`` runs: on a CUDA ``device`` the caching
    allocator's peak statistic, elsewhere the allocator events."""
    from torch.profiler import ProfilerActivity, profile

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    return _peak_of_allocations(prof.profiler.kineto_results.experimental_event_tree())


def _peak_of_allocations(roots) -> int:
    """Peak bytes held by the blocks allocated within a profiled region, from its allocation events.

    A free counts only when it releases a block allocated in the region, matched by device and address, and by the
    size recorded at that allocation. The profiler's own size of a freed block cannot be trusted for a block that
    existed before: it keeps the sizes of blocks it saw in earlier profiling sessions and reports a free at a
    reused address with the old block's size, so identical training steps read up to 40 % apart depending on
    where the allocator had placed the gradients they free.
    """
    from torch._C._profiler import _EventType

    events, stack = [], list(roots)
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            fields = event.extra_fields
            events.append((event.start_time_ns, str(fields.device), fields.ptr, fields.alloc_size))
    events.sort(key=lambda e: e[0])
    held: dict[tuple[str, int], int] = {}
    live = peak = 0
    for _, device, ptr, size in events:
        if size > 0:
            held[(device, ptr)] = size
            live += size
            peak = max(peak, live)
        else:
            live -= held.pop((device, ptr), 0)
    return peak


def training_memory_with_workspaces(step: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """:func:`peak_training_memory` of a step run once before (gradients and optimizer state exist, as in
    training), plus the mixing workspaces that the dynamic layers keep between steps (allocated during that
    first step, so not seen by the allocator events of the measured one)."""
    from ._chunked import clear_workspaces, workspace_bytes

    clear_workspaces()
    step()
    return peak_training_memory(step, device) + workspace_bytes()


def _device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def page_faults() -> int:
    """Minor page faults of this process so far (every thread; 0 where the platform does not count them): each is
    the kernel mapping one fresh page (4 KiB, or 2 MiB for a transparent huge page) on its first touch."""
    if resource is None:  # not a Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# Environment variables that change how this process gets its memory (glibc's malloc tunables, a preloaded
# allocator, PyTorch's transparent-huge-page switch); recorded with the results, since on a machine that maps
# fresh pages slowly they change both sides' figures (README, "Page faults").
ALLOCATOR_ENVIRONMENT = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", "THP_MEM_ALLOC_ENABLE")


def allocator_environment() -> dict[str, str]:
    """The variables of :data:`ALLOCATOR_ENVIRONMENT` that are set, with their values."""
    return {name: os.environ[name] for name in ALLOCATOR_ENVIRONMENT if name in os.environ}


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                        settle: int = 0, faults: dict[str, float] | None = None) -> dict[str, float]:
    """Median seconds of each function, the functions called in turn ``repeats`` times after ``warmup``.

    ``settle``: untimed calls of a function just before each of its timed calls, so that it is timed in its own
    steady state (caches, allocator) rather than in the state the previous side left. Batch-1 figures need it:
    without it a side measures up to 3x slower when it follows a side that allocated and freed a large kernel
    (benchmarks/batch1_order.py).

    ``faults``: if given, filled with each function's median number of minor page faults per timed call
    (:func:`page_faults`; counted for the whole process, while only that function runs).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    counts: dict[str, list[int]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            before = page_faults()
            times[name].append(_timed(fn))
            counts[name].append(page_faults() - before)
    if faults is not None:
        faults.update({name: statistics.median(c) for name, c in counts.items()})
    return {name: statistics.median(ts) for name, ts in times.items()}


def cuda_graph(model: nn.Module, x: Tensor) -> tuple[Callable[[], object], Tensor]:
    """``(replay, out)``: ``model(x)`` without gradients captured in a CUDA graph (after warm-up calls on a side
    stream); ``replay()`` recomputes ``out`` in place from the current contents of ``x``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = model(x)
    return graph.replay, out


def _infer(model: nn.Module, x: Tensor) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            model(x)

    return run


def _train(model: nn.Module, x: Tensor, loss_fn: Callable[[Tensor], Tensor],
           optimizer: torch.optim.Optimizer | None) -> Callable[[], object]:
    def run():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x)).backward()
        if optimizer is not None:
            optimizer.step()

    return run


FIGURES = ("b1", "batch", "train")


class _Side:
    """One model of a comparison, with one copy per memory format and the format chosen for each figure."""

    def __init__(self, model: nn.Module, formats: Sequence[str]):
        self.formats = list(formats)
        # a copy per format, so that no conversion runs between the interleaved timed calls
        self.models = {fmt: (model if i == 0 else copy.deepcopy(model)).to(memory_format=FORMATS[fmt])
                       for i, fmt in enumerate(self.formats)}
        self.chosen = {figure: self.formats[0] for figure in FIGURES}
        # median minor page faults per timed call in the chosen format, per figure
        self.page_faults = {figure: 0.0 for figure in FIGURES}

    def train(self, mode: bool) -> None:
        for model in self.models.values():
            model.train(mode)

    def runners(self, make_fn: Callable[[nn.Module, Tensor], Callable[[], object]],
                x: Tensor) -> dict[str, Callable[[], object]]:
        """``make_fn``'s function for every format of this side (its model copy and ``x`` in that format)."""
        return {fmt: make_fn(model, x.contiguous(memory_format=FORMATS[fmt])) for fmt, model in self.models.items()}


def _timed_in_best_format(sides: dict[str, _Side], figure: str,
                          runners: dict[str, dict[str, Callable[[], object]]], repeats: int,
                          settle: int = 0) -> dict[str, float]:
    """Every format of every side timed in the same interleaved rounds; each side's figure is its faster
    format's median (recorded in ``side.chosen``)."""
    fns = {(name, fmt): fn for name, by_format in runners.items() for fmt, fn in by_format.items()}
    faults: dict = {}
    medians = interleaved_medians(fns, repeats, settle=settle, faults=faults)
    best: dict[str, float] = {}
    for name, side in sides.items():
        fmt = min(side.formats, key=lambda f: medians[(name, f)])
        side.chosen[figure] = fmt
        side.page_faults[figure] = faults.get((name, fmt), 0.0)
        best[name] = medians[(name, fmt)]
    return best


def _measure(sides: dict[str, _Side], inputs: dict[str, Tensor], train_input: Tensor,
             loss_fn: Callable[[Tensor], Tensor], repeats: int, with_optimizer: bool) -> dict[str, dict[str, float]]:
    """Medians (seconds) and peak memory (bytes) of every side for the three figures, each side and figure in
    its faster memory format: all formats of all sides run in the same interleaved rounds, and the faster
    median of each side counts (a separate short calibration had picked the slower format in some runs)."""
    out: dict[str, dict[str, float]] = {name: {} for name in sides}
    for figure in ("b1", "batch"):
        for side in sides.values():
            side.train(False)
        runners = {name: side.runners(_infer, inputs[figure]) for name, side in sides.items()}
        settle = 2 if figure == "b1" else 0
        for name, t in _timed_in_best_format(sides, figure, runners, repeats, settle).items():
            out[name][figure] = t
    runners = {}
    for name, side in sides.items():
        side.train(True)
        optimizers = {id(m): torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) if with_optimizer else None
                      for m in side.models.values()}
        make = (lambda model, x, optimizers=optimizers: _train(model, x, loss_fn, optimizers[id(model)]))
        runners[name] = side.runners(make, train_input)
    for name, t in _timed_in_best_format(sides, "train", runners, repeats).items():
        out[name]["train"] = t
    for name, side in sides.items():
        fn = runners[name][side.chosen["train"]]
        out[name]["memory"] = float(training_memory_with_workspaces(fn, train_input.device))
    return out


def _rows(kind: str, name: str, measured: dict[str, dict[str, float]], sides: dict[str, _Side]) -> list[dict]:
    static = measured["static"]
    rows = []
    for side_name in ("dyconv", "naive"):
        if side_name not in measured:
            continue
        m = measured[side_name]
        row = {"kind": kind, "name": name, "implementation": side_name}
        for figure in FIGURES:
            row[f"{figure}_format"] = sides[side_name].chosen[figure]
            row[f"{figure}_static_format"] = sides["static"].chosen[figure]
            row[f"{figure}_page_faults"] = sides[side_name].page_faults[figure]
            row[f"{figure}_static_page_faults"] = sides["static"].page_faults[figure]
        row.update({
            "b1_static_ms": round(static["b1"] * 1e3, 3), "b1_ratio": round(m["b1"] / static["b1"], 3),
            "batch_static_ms": round(static["batch"] * 1e3, 3), "batch_ratio": round(m["batch"] / static["batch"], 3),
            "train_static_ms": round(static["train"] * 1e3, 3), "train_ratio": round(m["train"] / static["train"], 3),
            "memory_static_mb": round(static["memory"] / 2**20, 2),
            "memory_ratio": round(m["memory"] / max(static["memory"], 1.0), 3),
        })
        rows.append(row)
    return rows


def benchmark_layer(shape: LayerShape, *, batch_size: int = 32, repeats: int = 5, naive: bool = True,
                    num_experts: int = 4, device: torch.device | str = "cpu") -> list[dict]:
    """Rows (dyconv and naive) for one layer shape against ``nn.Conv2d`` of the same shape, on ``device``."""
    torch.manual_seed(0)
    static = shape.conv(device=device)
    dynamic = shape.conv(DynamicConv2d, num_experts=num_experts, device=device)
    sides = {"static": _Side(static, FORMATS), "dyconv": _Side(dynamic, FORMATS)}
    if naive:
        sides["naive"] = _Side(NaiveDynamicConv2d(copy.deepcopy(dynamic)), ["contiguous"])
    inputs = {"b1": torch.randn(1, shape.in_channels, shape.size, shape.size, device=device),
              "batch": torch.randn(batch_size, shape.in_channels, shape.size, shape.size, device=device)}
    half = max(1, shape.size // 2)
    # the input needs its gradient too, as it would inside a network
    train_input = torch.randn(batch_size, shape.in_channels, half, half, device=device, requires_grad=True)
    measured = _measure(sides, inputs, train_input, lambda y: y.square().mean(), repeats, with_optimizer=False)
    return _rows("layer", shape.name, measured, sides)


def benchmark_network(name: str, *, batch_size: int = 32, image_size: int = 224, train_image_size: int = 112,
                      repeats: int = 5, naive: bool = True, device: torch.device | str = "cpu") -> list[dict]:
    """Rows (dyconv and naive) for one network of :data:`NETWORKS` against its static torchvision twin, on
    ``device``."""
    torch.manual_seed(0)
    static, dynamic = build_network(name)
    sides = {"static": _Side(static.to(device), FORMATS), "dyconv": _Side(dynamic.to(device), FORMATS)}
    if naive:
        _, twin = build_network(name)
        sides["naive"] = _Side(naive_model(twin).to(device), ["contiguous"])
    inputs = {"b1": torch.randn(1, 3, image_size, image_size, device=device),
              "batch": torch.randn(batch_size, 3, image_size, image_size, device=device)}
    train_input = torch.randn(batch_size, 3, train_image_size, train_image_size, device=device)
    labels = torch.randint(0, 1000, (batch_size,), device=device)
    measured = _measure(sides, inputs, train_input, lambda y: F.cross_entropy(y, labels), repeats,
                        with_optimizer=True)
    return _rows("network", name, measured, sides)


def network_training_memory(name: str, *, batch_size: int = 32, image_size: int = 112) -> dict[str, int]:
    """Peak training-step memory in bytes of the static, dyconv and naive versions of network ``name``.

    The same figure as the memory column of :func:`run_benchmark`, without the timings (contiguous format).
    """
    torch.manual_seed(0)
    static, dynamic = build_network(name)
    twin = naive_model(build_network(name)[1])
    x = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(0, 1000, (batch_size,))
    peaks = {}
    for side, model in (("static", static), ("dyconv", dynamic), ("naive", twin)):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        step = _train(model, x, lambda y: F.cross_entropy(y, labels), optimizer)
        peaks[side] = training_memory_with_workspaces(step)
    return peaks


COLUMNS = ("kind", "name", "implementation", "b1_format", "b1_static_format", "batch_format", "batch_static_format",
           "train_format", "train_static_format", "b1_static_ms", "b1_ratio", "batch_static_ms", "batch_ratio",
           "train_static_ms", "train_ratio", "memory_static_mb", "memory_ratio", "b1_page_faults",
           "b1_static_page_faults", "batch_page_faults", "batch_static_page_faults", "train_page_faults",
           "train_static_page_faults")
_SHORT = {"contiguous": "C", "channels_last": "CL"}


def format_table(rows: Sequence[dict], batch_size: int = 32) -> str:
    """A Markdown table of benchmark rows (ratios to static; static medians in ms beside them; the memory formats
    of the side and of static for each figure, C = contiguous, CL = channels_last)."""
    head = ("| shape / network | impl. | batch 1 @224 | batch {b} @224 | train step b{b} @112 | train peak memory |"
            .format(b=batch_size))
    lines = [head, "|---|---|---|---|---|---|"]

    def fmt(r: dict, figure: str) -> str:
        return f"{_SHORT[r[figure + '_format']]}/{_SHORT[r[figure + '_static_format']]}"

    def ms(value: float) -> str:  # two significant digits below 10 ms (GPU layers take a fraction of one)
        return f"{value:.0f}" if value >= 10 else f"{value:.{1 if value >= 1 else 2}f}"

    for r in rows:
        lines.append(
            f"| {r['name']} | {r['implementation']} | {r['b1_ratio']:.2f}× ({ms(r['b1_static_ms'])} ms) "
            f"{fmt(r, 'b1')} "
            f"| {r['batch_ratio']:.2f}× ({ms(r['batch_static_ms'])} ms) {fmt(r, 'batch')} | {r['train_ratio']:.2f}× "
            f"({ms(r['train_static_ms'])} ms) {fmt(r, 'train')} | {r['memory_ratio']:.2f}× "
            f"({r['memory_static_mb']:.0f} MB) |")
    return "\n".join(lines)


def format_page_faults(rows: Sequence[dict]) -> str:
    """A Markdown table of the minor page faults per timed call (thousands; medians) of each row's side and of
    static, per figure: the pages the kernel mapped afresh during the call (README, "Page faults")."""
    lines = ["| shape / network | impl. | page faults per call, thousands: batch 1 | batch | train step |",
             "|---|---|---|---|---|"]
    for r in rows:
        cells = " | ".join(f"{r[figure + '_page_faults'] / 1e3:.1f} / {r[figure + '_static_page_faults'] / 1e3:.1f}"
                           for figure in FIGURES)
        lines.append(f"| {r['name']} | {r['implementation']} (/ static) | {cells} |")
    return "\n".join(lines)


def write_results(rows: Sequence[dict], csv_path: str | None, json_path: str | None, meta: dict,
                  extra: dict | None = None) -> None:
    """Write ``rows`` to a CSV file and/or a JSON file (with ``meta``: threads, versions, options; and the entries
    of ``extra`` beside ``meta`` and ``rows``)."""
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": list(rows), **(extra or {})}, f, indent=1)


def run_benchmark(*, layers: Sequence[LayerShape] | None = None, networks: Sequence[str] | None = None,
                  batch_size: int = 32, image_size: int = 224, train_image_size: int = 112, repeats: int = 5,
                  threads: int | None = 2, naive: bool = True, verbose: bool = True,
                  csv_path: str | None = None, json_path: str | None = None,
                  device: torch.device | str = "cpu") -> list[dict]:
    """Run the layer and network benchmarks; print the table if ``verbose``; write CSV/JSON if paths are given.

    Args:
        layers: layer shapes (default :data:`LAYER_SHAPES`; ``[]`` for none).
        networks: names from :data:`NETWORKS` (default both; ``[]`` for none).
        batch_size: the batch of the batched inference and of the training step (32).
        image_size, train_image_size: network input sizes for inference (224) and training (112).
        repeats: timed runs per figure and side (medians are reported).
        threads: ``torch.set_num_threads`` during the run (restored after); ``None`` leaves it.
        naive: also measure :class:`NaiveDynamicConv2d`.
        device: where the models and inputs live (``"cuda"`` times the GPU; the targets are the CPU's).

    Returns:
        One dict per (shape or network, implementation) with the keys of :data:`COLUMNS`.
    """
    layers = LAYER_SHAPES if layers is None else layers
    networks = NETWORKS if networks is None else networks
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows: list[dict] = []
    try:
        for shape in layers:
            rows += benchmark_layer(shape, batch_size=batch_size, repeats=repeats, naive=naive, device=device)
            if verbose:
                print(format_table(rows[-2 if naive else -1:], batch_size).split("\n", 2)[2], flush=True)
        for name in networks:
            rows += benchmark_network(name, batch_size=batch_size, image_size=image_size,
                                      train_image_size=train_image_size, repeats=repeats, naive=naive,
                                      device=device)
            if verbose:
                print(format_table(rows[-2 if naive else -1:], batch_size).split("\n", 2)[2], flush=True)
    finally:
        torch.set_num_threads(previous_threads)
    if verbose:
        print()
        print(format_table(rows, batch_size))
        print()
        print(format_page_faults(rows))
        environment = allocator_environment()
        print("allocator environment: " + (", ".join(f"{k}={v}" for k, v in environment.items()) or "default"))
    meta = {"threads": threads, "batch_size": batch_size, "image_size": image_size,
            "train_image_size": train_image_size, "repeats": repeats, "torch": torch.__version__,
            "layers": [asdict(s) for s in layers], "networks": list(networks), "device": _device_name(device),
            "allocator_environment": allocator_environment()}
    write_results(rows, csv_path, json_path, meta)
    return rows
