"""Deployment: export models holding dynamic convolutions with any batch size, and check the files against eager.

Plain PyTorch tools work on dyconv models: while tracing, exporting or compiling, the layers compute the
per-sample convolution with a strategy whose graph has no batch-size constant (see
:func:`dyconv.functional.select_strategy`). This module wraps them with the right arguments and checks
the result:

- :func:`export_onnx`: ``torch.onnx.export`` with a dynamic batch axis, either exporter (``dynamo=False``:
  the TorchScript-based one with ``dynamic_axes``; ``dynamo=True``: ``torch.export`` with ``dynamic_shapes``).
- :func:`export_torchscript`: ``torch.jit.script`` or ``torch.jit.trace``, saved with ``torch.jit.save``.
- :func:`load_exported`: the saved file as a callable (onnxruntime for ONNX, ``torch.jit.load`` otherwise).
- :func:`check_parity`: exported against eager at several batch sizes, as a :class:`ParityReport`.
- :func:`onnx_batch_constants`: integer constants of an ONNX graph derived from the example batch size
  (the batch-as-groups failure of other implementations), to prove a graph is batch-free.
- :func:`symbolic_trace` / :class:`DynamicConvTracer`: ``torch.fx`` tracing with the dynamic layers as leaves
  (their forward checks shapes in Python); :data:`FX_LEAF_MODULES` for torchvision's
  ``create_feature_extractor(..., tracer_kwargs={"leaf_modules": list(FX_LEAF_MODULES)})``.

``torch.compile(model, dynamic=True)`` needs nothing from here: the compiled graph is batch-generic and
is not recompiled when the batch size changes (sizes 0 and 1 aside, which dynamo always specialises).

Example:
    >>> model = torch.nn.Sequential(DynamicConv2d(3, 8, 3, padding=1), torch.nn.ReLU()).eval()
    >>> path = export_onnx(model, torch.randn(2, 3, 16, 16), "model.onnx")        # doctest: +SKIP
    >>> report = check_parity(model, load_exported(path), (3, 16, 16), batch_sizes=(1, 3, 7))  # doctest: +SKIP
    >>> report.ok                                                                  # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .layers import DYNAMIC_CONV_TYPES, DynamicConv2d  # noqa: F401  (DynamicConv2d: the docstring example)

FORMATS = ("onnx", "torchscript")
TORCHSCRIPT_METHODS = ("script", "trace")
FX_LEAF_MODULES = DYNAMIC_CONV_TYPES
"""Module types ``torch.fx`` must not trace into (their forward validates shapes with Python control flow)."""

# float32 parity of an exported model against eager: the exported graph computes the same sums in
# another order (another strategy, another runtime), so allow rounding-level differences only.
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5


def _check_example(example_input: Tensor) -> None:
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a tensor. Received: {type(example_input).__name__}")
    if example_input.dim() < 2:
        raise ValueError(f"example_input must be batched, (batch, channels, ...). Received: input shape "
                         f"{list(example_input.shape)}")


def export_onnx(model: nn.Module, example_input: Tensor, path: str | os.PathLike, *, dynamo: bool = False,
                opset_version: int | None = None, input_name: str = "input",
                output_name: str = "output") -> Path:
    """Export ``model`` to an ONNX file whose batch dimension (input and output dimension 0) is dynamic.

    Args:
        model: any module; put it in eval mode first (BatchNorm and dropout are exported as they are).
        example_input: a batched input ``(B, C, *spatial)``; use ``B >= 2`` (the dynamo exporter specialises
            a batch of 1). Only the batch size may differ at run time.
        path: the ``.onnx`` file to write (a single file: weights are stored inside it).
        dynamo: ``False``: the TorchScript-based exporter with ``dynamic_axes``; ``True``: the ``torch.export``
            based exporter with ``dynamic_shapes``.
        opset_version: ONNX opset; ``None``: the exporter's default.
        input_name, output_name: names of the graph's input and output.

    Returns:
        ``Path(path)``.

    Example:
        >>> export_onnx(model.eval(), torch.randn(2, 3, 224, 224), "model.onnx", dynamo=True)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module. Received: {type(model).__name__}")
    _check_example(example_input)
    if example_input.shape[0] < 2:
        raise ValueError(f"export with an example batch of at least 2: a batch of 1 is specialised by "
                         f"torch.export. Received: input shape {list(example_input.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    common = {"input_names": [input_name], "output_names": [output_name], "opset_version": opset_version}
    with warnings.catch_warnings():
        # The layers check the channel count in Python; tracing warns that it records those checks as
        # constants, which is right: only the batch dimension is dynamic.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if dynamo:
            batch = torch.export.Dim("batch")
            torch.onnx.export(model, (example_input,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch},), verbose=False, **common)
        else:
            axes = {input_name: {0: "batch"}, output_name: {0: "batch"}}
            torch.onnx.export(model, (example_input,), str(path), dynamo=False, dynamic_axes=axes, **common)
    return path


def export_torchscript(model: nn.Module, example_input: Tensor | None, path: str | os.PathLike, *,
                       method: str = "script") -> Path:
    """Compile ``model`` to TorchScript by scripting or tracing and save it with ``torch.jit.save``.

    A traced model runs at any batch size: the layers trace a batch-free strategy. A scripted model keeps
    the layers' strategy choice at run time (the fastest for each batch size).

    Args:
        model: the module (in the mode you want to save, usually eval).
        example_input: a batched input for ``method='trace'``; ignored by ``'script'`` (may be ``None``).
        path: the file to write (conventionally ``.pt``).
        method: ``'script'`` or ``'trace'``.

    Returns:
        ``Path(path)``; load it with ``torch.jit.load``.
    """
    if method not in TORCHSCRIPT_METHODS:
        raise ValueError(f"method must be one of {TORCHSCRIPT_METHODS}. Received: method={method!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module. Received: {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # see export_onnx
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* are deprecated in favour of torch.export
        if method == "trace":
            if example_input is None:
                raise ValueError("method='trace' needs an example_input. Received: example_input=None")
            _check_example(example_input)
            # check_trace would only re-run the example batch; check_parity tests other batch sizes
            compiled = torch.jit.trace(model, example_input, check_trace=False)
        else:
            compiled = torch.jit.script(model)
        torch.jit.save(compiled, str(path))
    return path


def load_exported(path: str | os.PathLike, format: str | None = None) -> Callable[[Tensor], Tensor]:
    """Load an exported file as a function from an input tensor to the output tensor.

    ``.onnx`` files run in onnxruntime (CPU); anything else is loaded with ``torch.jit.load``.

    Args:
        path: the file.
        format: ``'onnx'`` or ``'torchscript'``; ``None``: from the suffix (``.onnx`` or not).
    """
    path = Path(path)
    if format is None:
        format = "onnx" if path.suffix == ".onnx" else "torchscript"
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}. Received: format={format!r}")
    if format == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")
        return lambda x: module(x)
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are not the user's concern
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.detach().cpu().numpy()})[0])

    return run


@dataclass(frozen=True)
class ParityResult:
    """One batch size of a :class:`ParityReport`."""

    batch_size: int
    max_abs_error: float  # max |exported - eager|
    max_abs_eager: float  # max |eager|: the scale the error is judged against
    shape_ok: bool
    ok: bool


@dataclass(frozen=True)
class ParityReport:
    """Exported output against eager output, per batch size (see :func:`check_parity`)."""

    results: tuple[ParityResult, ...]
    rtol: float
    atol: float

    @property
    def ok(self) -> bool:
        """Every batch size matched (see :func:`check_parity` for the criterion)."""
        return all(r.ok for r in self.results)

    def __str__(self) -> str:
        lines = [f"batch  max |exported - eager|  max |eager|  result   "
                 f"(ok: |error| <= {self.atol:g} max|eager| + {self.rtol:g} |eager|)"]
        for r in self.results:
            verdict = "ok" if r.ok else ("SHAPE MISMATCH" if not r.shape_ok else "MISMATCH")
            lines.append(f"{r.batch_size:>5}  {r.max_abs_error:>20.3g}  {r.max_abs_eager:>11.3g}  {verdict}")
        return "\n".join(lines)


def check_parity(reference: nn.Module | Callable[[Tensor], Tensor], exported: Callable[[Tensor], Tensor],
                 sample_shape: Sequence[int], *, batch_sizes: Sequence[int] = (1, 3, 7), rtol: float = DEFAULT_RTOL,
                 atol: float = DEFAULT_ATOL, seed: int = 0) -> ParityReport:
    """Run ``reference`` (eager) and ``exported`` on the same random batches and compare the outputs.

    A batch size matches when the shapes agree and, elementwise,
    ``|exported - eager| <= atol * max|eager| + rtol * |eager|``: the absolute part is relative to the output's
    scale, so a freshly initialised network with tiny outputs is not waved through and one with large
    outputs is not failed for float32 rounding.

    Args:
        reference: the eager model (called under ``torch.no_grad``; put it in eval mode first).
        exported: e.g. :func:`load_exported`'s result, a traced/scripted/compiled module or an FX GraphModule.
        sample_shape: one sample's shape, ``(C, *spatial)``.
        batch_sizes: the batch sizes to try.
        rtol, atol: the tolerances above.
        seed: seed of the random inputs (standard normal, float32).

    Returns:
        A :class:`ParityReport`; ``report.ok`` says whether every batch size matched, ``str(report)`` is a table.

    Example:
        >>> traced = torch.jit.trace(model, torch.randn(2, 3, 32, 32))                  # doctest: +SKIP
        >>> check_parity(model, traced, (3, 32, 32), batch_sizes=(1, 5)).ok              # doctest: +SKIP
        True
    """
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive ints. Received: batch_sizes={tuple(batch_sizes)!r}")
    generator = torch.Generator().manual_seed(seed)
    results = []
    for batch in batch_sizes:
        x = torch.randn((batch, *sample_shape), generator=generator)
        with torch.no_grad():
            expected = reference(x)
            got = exported(x)
        got = torch.as_tensor(got).to(expected.dtype)
        shape_ok = tuple(got.shape) == tuple(expected.shape)
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if shape_ok:
            diff = (got - expected).abs()
            max_abs = float(diff.max()) if diff.numel() else 0.0
            ok = bool((diff <= atol * scale + rtol * expected.abs()).all())
        else:
            max_abs = float("inf")
            ok = False
        results.append(ParityResult(batch, max_abs, scale, shape_ok, ok))
    return ParityReport(tuple(results), rtol, atol)


def onnx_batch_constants(onnx_model, batch_size: int, channels: Sequence[int] = ()) -> list[str]:
    """Places in an ONNX graph whose integer constants come from the batch size it was exported with.

    Batch-as-groups implementations bake the batch into the graph: a ``Conv`` with ``group = B * groups``,
    ``Reshape`` targets such as ``[1, B * C, H, W]`` or ``[B * C_out, ...]``. Export with an unusual batch
    (say 13) and look for it: every integer in node attributes, ``Constant`` nodes and integer initializers
    (the tensors Reshape/Expand/Tile/ConstantOfShape take as shapes) is compared against ``batch_size`` and
    against ``batch_size * c`` for each ``c`` in ``channels``. Float weights are not scanned.

    Args:
        onnx_model: an ``onnx.ModelProto`` or a path to a ``.onnx`` file.
        batch_size: the example batch size used for the export (choose one that no layer size equals).
        channels: channel and group counts of the model's layers (``B * c`` is what batch folding produces).

    Returns:
        Human-readable descriptions of the suspicious constants; empty for a batch-free graph.
    """
    import onnx
    from onnx import numpy_helper

    if isinstance(onnx_model, (str, os.PathLike)):
        onnx_model = onnx.load(str(onnx_model))
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2. Received: batch_size={batch_size!r}")
    suspicious = {batch_size} | {batch_size * int(c) for c in channels}
    integer_types = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
                     onnx.TensorProto.UINT64, onnx.TensorProto.UINT32}
    found: list[str] = []

    def scan_tensor(tensor, where: str) -> None:
        if tensor.data_type not in integer_types:
            return
        values = {int(v) for v in numpy_helper.to_array(tensor).reshape(-1).tolist()}
        hits = sorted(values & suspicious)
        if hits:
            found.append(f"{where}: integer tensor holds {hits}")

    def scan_graph(graph, prefix: str) -> None:
        for init in graph.initializer:
            scan_tensor(init, f"{prefix}initializer {init.name!r}")
        for node in graph.node:
            where = f"{prefix}{node.op_type} node {node.name!r}"
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.INT and attr.i in suspicious:
                    found.append(f"{where}: attribute {attr.name}={attr.i}")
                elif attr.type == onnx.AttributeProto.INTS and suspicious & set(attr.ints):
                    found.append(f"{where}: attribute {attr.name}={list(attr.ints)}")
                elif attr.type == onnx.AttributeProto.TENSOR:
                    scan_tensor(attr.t, f"{where} attribute {attr.name}")
                elif attr.type == onnx.AttributeProto.GRAPH:
                    scan_graph(attr.g, f"{where} / ")
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        scan_graph(g, f"{where} / ")

    scan_graph(onnx_model.graph, "")
    for function in onnx_model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    scan_tensor(attr.t, f"function {function.name} {node.op_type} attribute {attr.name}")
    return found


def layer_channels(model: nn.Module) -> list[int]:
    """The channel and group counts of every dynamic layer in ``model`` (for :func:`onnx_batch_constants`)."""
    counts = set()
    for module in model.modules():
        if isinstance(module, DYNAMIC_CONV_TYPES):
            counts.update({module.in_channels, module.out_channels, module.groups,
                           module.out_channels // module.groups, module.in_channels // module.groups})
    return sorted(counts)


class DynamicConvTracer(torch.fx.Tracer):
    """A ``torch.fx`` tracer that keeps the dynamic convolutions as leaf ``call_module`` nodes.

    Their forward validates the input shape with Python control flow, which symbolic tracing cannot
    follow; as leaves they appear in the graph like ``nn.Conv2d`` does.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, FX_LEAF_MODULES) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` for models holding dynamic convolutions (kept as leaves).

    Example:
        >>> gm = symbolic_trace(nn.Sequential(DynamicConv2d(3, 8, 3), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module. Received: {type(model).__name__}")
    graph = DynamicConvTracer().trace(model)
    name = model.__class__.__name__
    return torch.fx.GraphModule(model, graph, name)


def export_and_check(model: nn.Module, sample_shape: Sequence[int], output: str | os.PathLike, *,
                     format: str = "onnx", dynamo: bool = True, method: str = "script", example_batch: int = 2,
                     batch_sizes: Sequence[int] = (1, 3, 7), rtol: float = DEFAULT_RTOL,
                     atol: float = DEFAULT_ATOL) -> tuple[Path, ParityReport]:
    """Export ``model`` (put in eval mode), load the file back and compare it against eager at ``batch_sizes``.

    What ``dyconv export`` runs. A file with a batch size baked in fails the check at the other batch sizes.

    Args:
        model: the model; it is switched to eval mode.
        sample_shape: one input sample's shape ``(C, *spatial)``.
        output: the file to write.
        format: ``'onnx'`` or ``'torchscript'``.
        dynamo: ONNX only: which exporter (see :func:`export_onnx`).
        method: TorchScript only: ``'script'`` or ``'trace'``.
        example_batch: batch size of the example input used for exporting/tracing (at least 2).
        batch_sizes, rtol, atol: see :func:`check_parity`.

    Returns:
        ``(path, report)``.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}. Received: format={format!r}")
    sample_shape = tuple(int(s) for s in sample_shape)
    if not sample_shape or any(s < 1 for s in sample_shape):
        raise ValueError(f"sample_shape must be (channels, *spatial) with positive sizes. Received: "
                         f"sample_shape={sample_shape!r}")
    model = model.eval()
    example = torch.randn((example_batch, *sample_shape), generator=torch.Generator().manual_seed(1))
    if format == "onnx":
        path = export_onnx(model, example, output, dynamo=dynamo)
    else:
        path = export_torchscript(model, example, output, method=method)
    report = check_parity(model, load_exported(path, format), sample_shape, batch_sizes=batch_sizes, rtol=rtol,
                          atol=atol)
    return path, report
