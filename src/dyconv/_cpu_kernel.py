"""The compiled CPU kernel (``csrc/cpu_kernel.cpp``): building it, and the two places the layers use it.

* The ``"depthwise_kernel"`` strategy. PyTorch has no depthwise convolution with a different kernel per sample.
  Its ways around that (the batch folded into the groups, or one convolution per sample) cost 1.1–4.8× a static
  depthwise convolution at batch 32 for MobileNetV2's layers, attention included, where the static one is cheap.
  ``torch.ops.dyconv_cpu.depthwise_forward`` mixes each sample's kernel from the K experts and convolves with it
  in one pass over channels-innermost (channels_last) memory, and ``depthwise_backward`` is the matching backward
  (input gradient gathered per input row, per-sample kernel gradients summed per block of output rows). Nothing
  but the input, the experts, the attention and the per-sample kernels (``batch × taps × channels``: small for
  depthwise layers) is kept for backward. Inside a row, the positions whose every kernel column reads inside it go
  four at a time, each kernel vector loaded once for the four. Without gradients, a channels_last batch's whole
  layer is one call (``depthwise_inference``, :func:`dyconv._one_sample.infer_depthwise`): each sample's attention,
  kernel and convolution on one thread while its input is in that core's caches, where the general path reads
  the input twice from memory (for the attention's mean, then for the convolution).
* Batch-1 inference of every layer (:mod:`dyconv._one_sample`): ``torch.ops.dyconv_cpu.one_sample_mix`` computes
  the attention (input sum, the two linear layers, ReLU, softmax with the temperature) and mixes the kernel into
  the thread's workspace in one call, where PyTorch operators take six; for depthwise layers on channels_last input
  ``one_sample_depthwise`` computes the attention and then runs ``depthwise_forward``, the whole layer in one call.
  ``csrc/one_sample.cpp``, built into the same module, adds ``OneSamplePlan`` (:func:`one_sample_plan_type`): a
  layer's checks and its whole batch-1 route in one call from Python.
* The ``"dense_kernel"`` strategy: ungrouped stride-1 layers with zero padding.
  ``torch.ops.dyconv_cpu.dense_forward`` mixes each sample's kernel inside the convolution's own tiles (a few
  output channels and a few hundred kernel elements at a time, into a buffer that stays in cache; two loops, vectors
  of output positions at small batches and vectors of output channels from a few samples on), so the per-sample
  kernels are never written to memory: at batch 32 the other strategies write and read back ``batch × kernel
  size`` per layer, 302 MB for a 3×3 512->512 layer. ``dense_backward`` does the same for the gradients: the input
  gradient is the same kind of loop over the output gradient with the experts transposed and their taps flipped,
  and each sample's kernel gradient is computed a register tile at a time and folded at once into the experts'
  gradients (``sum_b a[b, k] dW_b``) and the attention's (``<dW_b, W_k>``), never written whole either. The
  experts' gradient of a large layer comes from reused memory (``csrc/reused_memory.cpp``,
  :func:`reused_memory_bytes`), not from memory mapped afresh and faulted in page by page on every training step
  (37.7 MB for a 3×3 512->512 layer: 9.2 thousand page faults a step; its training step 8.0 ms faster a paired
  round with the pool, README "Where it stands"). Its
  convolution is a plain register-tiled loop, slower than oneDNN's per FLOP, so
  :func:`dyconv.functional.select_strategy` takes it only for small outputs (deep 3×3 layers), where streaming the
  kernels is what costs.

The kernel is compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja, a dependency,
are needed; ``-march=native``, so the build's name carries a digest of the CPU's flags, and one of the source) and
cached by PyTorch in ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). Without a compiler, or with
the environment variable ``DYCONV_CPU_KERNEL=0``, :func:`available` is false (with one warning saying why), and the
layers use PyTorch operators instead (same results up to rounding).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._chunked import autocast_dtype, conv_chunked, python_dispatch_active, unviewed

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernel.cpp"
# the batch-1 layer in one call from Python (dyconv._one_sample), built into the same module
PLAN_SOURCE = SOURCE.with_name("one_sample.cpp")
MEMORY_SOURCE = SOURCE.with_name("reused_memory.cpp")
ENV_SWITCH = "DYCONV_CPU_KERNEL"
DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
_state: dict = {"tried": False, "loaded": False, "error": None, "module": None}


def _cpu_tag() -> str:
    """A short digest of the CPU's model and flags (the build uses ``-march=native``)."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features")):
                    text += line
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _build() -> None:
    # cpp_extension logs a warning about CUDA on machines without it (on import); this build never uses CUDA
    logger = logging.getLogger("torch.utils.cpp_extension")
    level, path = logger.level, os.environ.get("PATH")
    logger.setLevel(logging.ERROR)
    if shutil.which("ninja") is None:
        try:  # the PyPI package's binary (a dependency), which need not be on PATH when a venv is not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + (path or "")
        except ImportError:
            pass
    try:
        from torch.utils import cpp_extension

        # one build per CPU and source version: installs of different versions do not rebuild over each other
        sources = [SOURCE, PLAN_SOURCE, MEMORY_SOURCE]
        source = hashlib.sha1(b"".join(path.read_bytes() for path in sources)).hexdigest()[:10]
        _state["module"] = cpp_extension.load(
            name=f"dyconv_cpu_{_cpu_tag()}_{source}", sources=[str(path) for path in sources],
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=True,
            verbose=False)
    finally:
        logger.setLevel(level)
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


def available() -> bool:
    """Whether the compiled kernel is loaded (building it on the first call; ``False`` if that fails, or when
    ``DYCONV_CPU_KERNEL=0``)."""
    if _state["tried"]:
        return _state["loaded"]
    with _lock:
        if not _state["tried"]:
            if os.environ.get(ENV_SWITCH, "1") == "0":
                _state["error"] = ENV_SWITCH + "=0"
            else:
                try:
                    _build()
                    _state["loaded"] = True
                except Exception as e:  # no compiler, no ninja, a failed build: fall back, say so once
                    _state["error"] = f"{type(e).__name__}: {e}"
                    warnings.warn("dyconv: the compiled CPU kernel is not available (" + _state["error"]
                                  + "); the layers use PyTorch operators instead", RuntimeWarning,
                                  stacklevel=2)
            _state["tried"] = True
    return _state["loaded"]


def one_sample_plan_type():
    """``OneSamplePlan`` (``csrc/one_sample.cpp``): a layer's batch-1 inference in one call, checks included
    (:mod:`dyconv._one_sample`); ``None`` where the kernel is not loaded."""
    return _state["module"].OneSamplePlan if available() else None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is false (``None`` when it is true or was not asked yet)."""
    return _state["error"]


def reused_memory_bytes() -> Tuple[int, int]:
    """``(bytes held by tensors, bytes kept for reuse)`` of the kernel's reused memory (``csrc/reused_memory.cpp``:
    the experts' gradients of large layers from ``dense_backward``, kept when freed for the next backward of the same
    size instead of mapped afresh by every training step; at most 512 MiB kept); ``(0, 0)`` where the kernel is not
    loaded."""
    if not _state["loaded"]:
        return 0, 0
    held, kept = torch.ops.dyconv_cpu.reused_memory_bytes()
    return held, kept


def release_reused_memory() -> None:
    """Free the blocks the kernel's reused memory keeps (:func:`reused_memory_bytes`); blocks that tensors hold are
    freed with them."""
    if _state["loaded"]:
        torch.ops.dyconv_cpu.release_reused_memory()


def channels_innermost(x: Tensor) -> bool:
    """Whether ``x`` ``(B, C, *spatial)`` lies in memory as ``(B, *spatial, C)`` (channels_last)."""
    return x.movedim(1, -1).is_contiguous()


@torch.jit.unused
def applies(x: Tensor, weight: Tensor, groups: int) -> bool:
    """Whether the kernel computes this call: a depthwise layer (one input and one output channel per group) on
    the CPU, float32 or float64, channels-innermost input, no autocast and no Python dispatch mode. (Asks
    :func:`available`, which builds the kernel on first use.)"""
    if groups == 1 or x.shape[1] != groups or weight.shape[1] != groups or weight.shape[2] != 1:
        return False
    if x.device.type != "cpu" or x.dtype not in DTYPES or weight.dtype != x.dtype:
        return False
    if not channels_innermost(x) or autocast_dtype("cpu") is not None:
        return False
    if python_dispatch_active():
        return False  # a dispatch mode (e.g. dyconv.profile's FLOP counter) would not see inside the kernel
    return available()


@torch.jit.unused
def one_sample_mix_applies(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether ``torch.ops.dyconv_cpu.one_sample_mix`` (batch-1 inference: the attention and the mixing in one call,
    ``dyconv._one_sample``) takes these attention parameters and expert biases: contiguous, on the CPU, one dtype,
    float32 or float64. (Asks :func:`available`.)"""
    tensors = [w1, b1, w2, b2] + ([] if bias is None else [bias])
    if w1.dtype not in DTYPES or any(t.dtype != w1.dtype or t.device.type != "cpu" for t in tensors):
        return False
    return all(t.is_contiguous() for t in tensors) and available()


def _channels_innermost(t: Tensor) -> Tensor:
    return t if channels_innermost(t) else t.movedim(1, -1).contiguous().movedim(-1, 1)


def _bias_gradients(grad_out: Tensor, attention: Tensor, bias: Tensor, need_bias: bool, need_attention: bool,
                    grad_attention: Optional[Tensor]) -> "tuple[Optional[Tensor], Optional[Tensor]]":
    """The mixed bias's part of the compiled kernels' gradients: the experts' biases get ``attention^T @ g`` and the
    attention ``g @ bias^T`` (added to ``grad_attention`` when given), ``g`` being the output gradient summed over
    positions."""
    g_bias = grad_out.sum(list(range(2, grad_out.dim())))
    grad_bias = torch.mm(attention.t(), g_bias) if need_bias else None
    if need_attention:
        extra = torch.mm(g_bias, bias.t())
        grad_attention = extra if grad_attention is None else grad_attention + extra
    return grad_bias, grad_attention


class _DepthwiseKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                padding: List[int], dilation: List[int]) -> Tensor:
        out, mixed = torch.ops.dyconv_cpu.depthwise_forward(x, weight, attention, bias, stride, padding, dilation)
        ctx.conv_args = (list(weight.shape[3:]), stride, padding, dilation)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias if bias is not None else weight.new_empty(0), attention, mixed)
        return unviewed(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight, bias, attention, mixed = ctx.saved_tensors
        kernel, stride, padding, dilation = ctx.conv_args
        need_x, need_w, need_b, need_a = ctx.needs_input_grad[:4]
        gy = _channels_innermost(grad_out.to(x.dtype))
        grad_x, grad_mixed = torch.ops.dyconv_cpu.depthwise_backward(gy, x, mixed, kernel, stride, padding,
                                                                     dilation, need_x, need_w or need_a)
        num_experts, channels = weight.shape[0], weight.shape[1]
        a = attention.to(x.dtype)
        grad_weight = grad_bias = grad_a = None
        if need_w or need_a:
            g = grad_mixed.reshape(grad_mixed.shape[0], -1)  # (B, taps * C)
            if need_w:
                # d/dW_k = sum_b a[b,k] dW_b, from (K, taps, C) to the experts' (K, C, 1, *kernel)
                grad_weight = torch.mm(a.t(), g).reshape(num_experts, -1, channels).transpose(1, 2)
                grad_weight = grad_weight.reshape(weight.shape)
            if need_a:
                # d/da[b,k] = <dW_b, W_k>
                experts = weight.reshape(num_experts, channels, -1).transpose(1, 2)
                grad_a = torch.mm(g, experts.reshape(num_experts, -1).t())
        if ctx.has_bias and (need_b or need_a):
            grad_bias, grad_a = _bias_gradients(gy, a, bias, need_b, need_a, grad_a)
        if grad_a is not None:
            grad_a = grad_a.to(attention.dtype)
        return grad_x, grad_weight, grad_bias, grad_a, None, None, None


def _kernel_arguments(strategy: str, x: Tensor, weight: Tensor,
                      bias: Optional[Tensor]) -> "tuple[Tensor, Optional[Tensor]]":
    """The checks both compiled strategies make (the CPU, float32 or float64, the kernel built), and the experts and
    biases in ``x``'s dtype."""
    if x.device.type != "cpu" or x.dtype not in DTYPES:
        raise ValueError(f"strategy '{strategy}' runs on the CPU in float32 or float64: got "
                         f"device={x.device.type}, dtype={x.dtype}")
    if not available():
        raise RuntimeError(f"strategy '{strategy}': the compiled CPU kernel is not available ({unavailable_reason()})")
    return weight.to(x.dtype), None if bias is None else bias.to(x.dtype)


@torch.jit.unused
def conv_depthwise_kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                          padding: List[int], dilation: List[int], groups: int) -> Tensor:
    """The ``"depthwise_kernel"`` strategy: ``x`` channels-innermost on the CPU (otherwise copied to it), a
    depthwise layer (``groups`` = input = output channels). The output is channels-innermost too."""
    if groups != x.shape[1] or weight.shape[1] != groups or weight.shape[2] != 1:
        raise ValueError("strategy 'depthwise_kernel' needs a depthwise layer (groups = input channels = output "
                         f"channels): got groups={groups}, input channels {x.shape[1]}, weight {tuple(weight.shape)}")
    weight, bias = _kernel_arguments("depthwise_kernel", x, weight, bias)
    return _DepthwiseKernel.apply(_channels_innermost(x), weight, bias, attention, list(stride), list(padding),
                                  list(dilation))


DENSE_MAX_POSITIONS = 196
"""The most output positions per sample for which :func:`dyconv.functional.select_strategy` takes
``"dense_kernel"`` (14×14: the deep 3×3 layers of ResNets), at any batch size, with or without gradients. At batch
32, float32, contiguous, as ratios to static (``PYTHONPATH=src python benchmarks/strategies.py --layers "3x3 64"
"3x3 256" "3x3 512" --sizes 7 14 28 56 --strategies chunked dense_kernel``, 2026-11-30 at ddf0d4b, since which
``dense_forward`` takes its channels loop from batch 8 on): 3×3 64->64 @7 / @14 / @28 / @56 dense 1.88× / 1.38× / 1.37×
/ 1.51× against chunked 2.69× / 1.45× / 1.17× / 1.15×; 256->256 1.66× / 1.40× / 1.49× / 1.35× against 4.07× / 1.93× /
1.28× / 1.00×; 512->512 1.63× / 1.37× / 1.47× / 1.41× against 6.32× / 2.67× / 1.61× / 1.42×. The training step at
10² / 14² (``... --sizes 20 28 --train``): 64->64 dense 1.69× / 1.26× against chunked 3.02× / 2.29×; 256->256 1.60× /
1.49× against 3.20× / 2.06×; 512->512 1.45× / 1.35× against 3.46× / 2.26×. (At 20², inference, dense lost for 64 and
256 channels: 1.43× and 1.53× against 1.29× and 1.36×.)"""

DENSE_1X1_MAX_POSITIONS = 64
DENSE_1X1_MIN_BATCH = 8
"""For 1×1 kernels :func:`dyconv.functional.select_strategy` takes ``"dense_kernel"`` at most at
``DENSE_1X1_MAX_POSITIONS`` output positions per sample and from batch ``DENSE_1X1_MIN_BATCH`` on (where
``dense_forward`` takes its channels loop for any experts; the grid loop was not measured for 1×1 kernels). Batch 32,
ratios to static (``PYTHONPATH=src python benchmarks/strategies.py --layers 1x1 --sizes 8 14 28 --train --format
channels_last --settle 1 --strategies chunked dense_kernel``, and ``--format contiguous``; 2026-11-30 at d33fde0), for
24->144 / 144->24 / 96->576 / 576->96: channels_last, inference at 8² (64 positions) dense 2.04× / 1.70× / 1.60× /
2.08× against chunked 2.52× / 2.54× / 3.06× / 3.39×, the training step at 4² 1.63× / 1.91× / 1.96× / 2.54× against
2.37× / 2.87× / 4.12× / 5.51× and at 7² 1.89× / 2.31× / 1.61× / 1.92× against 1.98× / 2.40× / 2.24× / 2.82×;
contiguous, the faster in 3 of 4 at 8² inference (576->96 1.98× against 1.65×), 4 of 4 in training at 4², 2 of 4 at
7² (the 24/144-channel layers 2.09× / 2.22× against 1.71× / 1.87×, the others 1.67× / 1.86× against 2.16× / 2.10×).
At 196 positions it was the faster in 3 of 8 inference cells (14², both formats: 3 of 4 channels_last, none
contiguous) and in none of the 8 training cells (14²); at 784 (28² inference) in none.
In DY-MobileNetV2 (``benchmarks/ab.py --against 6344087 --network mobilenet_v2 --figures train batch --format
channels_last --rounds 7``, at 3da0bf2, with d33fde0's kernel changes): the training step -80.2 ms (faster in 18 of
21 rounds), batch-32 inference -46.8 ms (19 of 21)."""


@torch.jit.unused
def dense_applies(x: Tensor, weight: Tensor, stride: List[int], groups: int) -> bool:
    """Whether ``torch.ops.dyconv_cpu.dense_forward`` can compute this call: an ungrouped stride-1 layer on the
    CPU, float32 or float64 (input and experts alike), no autocast and no Python dispatch mode. (Asks
    :func:`available`.) The padding must be zeros, applied by the convolution (``dynamic_conv`` pads the others
    beforehand)."""
    if groups != 1 or any(s != 1 for s in stride) or x.device.type != "cpu" or x.dtype not in DTYPES:
        return False
    if weight.dtype != x.dtype or weight.device.type != "cpu" or autocast_dtype("cpu") is not None:
        return False
    if python_dispatch_active():
        return False
    return available()


class _DenseKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, padding: List[int],
                dilation: List[int]) -> Tensor:
        ctx.conv_args = (padding, dilation)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias if bias is not None else weight.new_empty(0), attention)
        return torch.ops.dyconv_cpu.dense_forward(x, weight, attention, bias, padding, dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight, bias, attention = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        padding, dilation = ctx.conv_args
        need_x, need_w, need_b, need_a = ctx.needs_input_grad[:4]
        if not dense_backward_applies(weight, padding, dilation):
            return _recomputed_gradients(ctx, grad_out)
        grad_out = grad_out.to(x.dtype)
        grad_x, grad_weight, grad_a = torch.ops.dyconv_cpu.dense_backward(grad_out, x, weight, attention, padding,
                                                                          dilation, need_x, need_w or need_a)
        grad_bias = None
        if bias is not None and (need_b or need_a):
            grad_bias, grad_a = _bias_gradients(grad_out, attention.to(x.dtype), bias, need_b, need_a, grad_a)
        return (grad_x if need_x else None, grad_weight if need_w else None, grad_bias,
                grad_a.to(attention.dtype) if need_a else None, None, None)


def dense_backward_applies(weight: Tensor, padding: List[int], dilation: List[int]) -> bool:
    """Whether ``torch.ops.dyconv_cpu.dense_backward`` computes this layer's gradients: its input gradient is a
    convolution of the output gradient with padding ``dilation * (kernel - 1) - padding``, which must not be
    negative (padding larger than the kernel's reach: the layer's gradients are recomputed with ``"chunked"``)."""
    kernel = weight.shape[3:]
    return all(p <= d * (k - 1) for p, d, k in zip(padding, dilation, kernel))


def _recomputed_gradients(ctx, grad_out: Tensor):
    """The gradients of a ``_DenseKernel`` call from the layer recomputed with the ``"chunked"`` strategy."""
    saved = list(ctx.saved_tensors)
    if not ctx.has_bias:
        saved[2] = None
    padding, dilation = ctx.conv_args
    inputs = [None if t is None else t.detach().requires_grad_(need)
              for t, need in zip(saved, ctx.needs_input_grad[:4])]
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[:4]) if t is not None and need]
    with torch.enable_grad():
        out = conv_chunked(inputs[0], inputs[1], inputs[2], inputs[3], [1] * len(padding), padding, dilation, 1)
    grads = iter(torch.autograd.grad(out, wanted, grad_out))
    result = [next(grads) if t is not None and need else None for t, need in zip(inputs, ctx.needs_input_grad[:4])]
    return result[0], result[1], result[2], result[3], None, None


@torch.jit.unused
def conv_dense_kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                      padding: List[int], dilation: List[int], groups: int) -> Tensor:
    """The ``"dense_kernel"`` strategy: an ungrouped stride-1 layer on the CPU, float32 or float64, any memory
    format (the output has the input's)."""
    if groups != 1 or any(s != 1 for s in stride):
        raise ValueError("strategy 'dense_kernel' needs an ungrouped stride-1 layer: got groups="
                         f"{groups}, stride={list(stride)}")
    weight, bias = _kernel_arguments("dense_kernel", x, weight, bias)
    return _DenseKernel.apply(x, weight, bias, attention, list(padding), list(dilation))
