"""The ``"chunked"`` strategy: per-sample convolution over batch chunks, kernels recomputed in backward.

Mixing the K experts materialises one kernel per sample: ``batch × kernel size`` values per layer. Kept for
backward by autograd in every layer of a network, they grow with the batch until memory runs out (the
complaint in spec §3). Here the batch is processed in chunks whose mixed kernels stay under a fixed number
of elements, and a custom :class:`torch.autograd.Function` saves only the inputs, the experts and the
attention: backward mixes each chunk's kernels again, takes the convolution's gradients for that chunk, and
turns the per-sample kernel gradients into the expert and attention gradients with two matrix products
before the next chunk. Live memory per layer is O(chunk × kernel size), whatever the batch.

Per chunk the convolution is one call: the chunk is folded into the convolution's groups (a dense
convolution when the chunk is one sample), or, for unpadded stride-1 1×1 kernels, one batched matrix product
that reads channels_last input without copying it. Where each sample's output is large (at least
``PER_SAMPLE_MIN_POSITIONS`` positions; for grouped layers without gradients also ``PER_SAMPLE_GROUPED_MIN_ELEMENTS``
input elements) every sample of the chunk gets its own convolution with the layer's groups instead: a
convolution with ``chunk × groups`` groups is slower there (depthwise layers at 56² and 112²: about twice the
per-sample convolutions' time), forward and backward (``benchmarks/mixing.py --part per-sample``).

Two measured CPU effects shape the eager path (``benchmarks/mixing.py`` shows both):

* A convolution whose kernel lies in freshly allocated memory can be slower than one whose kernel lies in
  memory the process has used before, so the mixed kernels are written with ``torch.mm(..., out=)`` (or, where
  the compiled CPU kernel is built, its ``mix_rows``: :func:`_compiled_mix`) into a reused per-thread workspace on
  the CPU. The size of the effect depends on the load: mix + 3x3 512→512 conv
  at 7², batch 1, 16.4 ms fresh against 14.0 ms reused with 2 threads on the quiet machine; 28.5 ms against
  11.5 ms with one thread while another process ran. The workspace never escapes: each chunk's convolution
  has consumed it before the next chunk is mixed.
* When one sample's kernel is larger than a chunk (deep 3×3 layers), mixing sample by sample re-reads all K
  experts from memory for every sample. Then the output channels are tiled so that the K experts of one
  tile stay in the cache while every sample's kernel for that tile is mixed and convolved.

On other devices (CUDA) none of this applies: no workspace, no tiles, no per-sample convolutions, and chunks of
up to ``ACCELERATOR_CHUNK_ELEMENTS`` (:func:`limits`), so that a layer is a few large launches. (``meta`` tensors
follow the CPU's rules: ``CPU_RULES``.)
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

# Elements of mixed kernels one chunk may hold (8 MiB of fp32): small enough for the last-level cache and
# for the allocator to reuse the buffer between chunks instead of mapping fresh pages every call, large
# enough that the experts are read only a few times per batch.
FORWARD_CHUNK_ELEMENTS = 1 << 21
# Backward reads the experts three times per chunk (mix, expert gradient, attention gradient) and keeps two
# buffers of this size (kernels, their gradients). 2**21 rather than a larger chunk: DY-ResNet-18's batch-32
# training step peaks at 1.76x static's memory with it, 1.93x with 2**22 and 2.22x with 2**23
# (benchmarks/memory.py), while the experts of one chunk (at most 9.4 MB for 3x3 256->256) stay in the cache.
BACKWARD_CHUNK_ELEMENTS = 1 << 21
# Elements of the K experts that one output-channel tile may hold, so that they stay in the last-level cache
# while every sample's kernel for the tile is mixed (used when one sample's kernel exceeds a chunk).
EXPERT_TILE_ELEMENTS = 1 << 21
# Output positions per sample from which each sample of a chunk gets its own convolution (with the layer's own
# groups) instead of the chunk folded into the groups: a convolution with batch x groups groups is slower than
# per-sample dense ones where each sample's output is large (benchmarks/mixing.py --part per-sample).
PER_SAMPLE_MIN_POSITIONS = 512
# ... and for grouped (e.g. depthwise) layers without gradients, at least this many input elements per sample.
# Batch 32, MobileNetV2's depthwise 3x3 (benchmarks/mixing.py --part depthwise, two runs): per sample faster from
# 192 x 28² (3.2-4.3x static against 5.7-7.9x folded) and at 144 x 56² with stride 2; folded faster below 512
# output positions (384 x 14²: 2.1x against 3.2-3.8x). (An earlier run had put 192 x 28² on the folded side.)
PER_SAMPLE_GROUPED_MIN_ELEMENTS = 1 << 17
# Input plus output elements of one folded convolution of a channels_last depthwise chunk: the chunk is convolved
# in pieces of at most this many (at least one sample each), each piece's input copied into a reused workspace, so
# that the workspaces stay bounded whatever the batch. Freshly allocated copies of the whole chunk (the former fold)
# were slower in the layers (576 @14, batch 32 inference: 6.6 ms faster in 29 of 29 paired rounds; 144 @28 stride 2
# training step: 17 ms, 29 of 29); in DY-MobileNetV2 as a whole the gain is not established (two in-process A/Bs at
# batch 32: 29 and 67 ms of about 1.2 s; ``benchmarks/ab.py --against c1ac487``, each side in its own process over
# three launches: 6 ms at batch 32 and 65 ms per training step, faster in 18 and 19 of 33 rounds). Batch 32,
# MobileNetV2's folded depthwise layers at the bench's sizes, all rows together (``benchmarks/mixing.py --part
# fold-chunks --rounds 15``, two runs): 2^20 the fastest budget at inference (35.8 and 43.0 ms; larger 36.3-63.0,
# smaller 41.9-70.3), within 4 % of the fastest in the training step (69.9 and 67.4 ms against 67.1 and 66.2; 2^18
# and smaller 91.0-174.4).
FOLD_CHUNK_ELEMENTS = 1 << 20
# On other devices (CUDA): the limits above are the CPU's (its caches, its allocator, its per-call cost) and
# do not apply. A GPU runs one large launch far better than many small ones (``dyconv bench --device cuda`` on
# an H200 with the CPU's limits: DY-ResNet-18 batch 32 at 26x static, the naive batch-as-groups code at 5x), so
# there each chunk is folded into the groups, never tiled or split per sample, and a chunk may hold this many
# elements of mixed kernels (128 MiB of fp32; twice that in backward, kernels and their gradients).
ACCELERATOR_CHUNK_ELEMENTS = 1 << 25
_NEVER = 1 << 62
# Device types that follow the CPU's rules (here and in dyconv.functional.select_strategy): the CPU, and meta
# (shape-only tensors), so that dyconv.profile counts a model built on meta as the CPU would run it.
CPU_RULES = ("cpu", "meta")

_workspaces = threading.local()

# the number of Python dispatch modes in effect (what torch.utils._python_dispatch._get_current_dispatch_mode_stack
# builds its list from; asked on every layer call at batch 1)
_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)


@torch.jit.unused
def workspace(numel: int, like: Tensor, slot: int = 0) -> Optional[Tensor]:
    """A reused flat buffer of ``numel`` elements for mixed kernels (CPU only; ``None`` elsewhere).

    One buffer per thread, device, dtype and ``slot``; it grows to the largest request and is never handed
    out twice at once within a slot. Callers must be done with it before asking for the same slot again.
    """
    buf = workspace_base(numel, like, slot)
    if buf is None:
        return None
    return buf[:numel]


@torch.jit.unused
def workspace_base(numel: int, like: Tensor, slot: int = 0) -> Optional[Tensor]:
    """The whole buffer behind :func:`workspace` (at least ``numel`` elements; ``None`` off the CPU). It is
    replaced when a larger request comes, so holders of views into it compare it with ``is`` before reuse."""
    if like.device.type != "cpu":
        return None  # the CUDA caching allocator already reuses memory
    cache: Optional[Dict[Tuple[torch.device, torch.dtype, int], Tensor]] = getattr(_workspaces, "cache", None)
    if cache is None:
        cache = {}
        _workspaces.cache = cache
    key = workspace_key(like, slot)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        # a normal tensor even under torch.inference_mode: an inference tensor could not be written outside it
        with torch.inference_mode(False):
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        cache[key] = buf
    return buf


def workspace_key(like: Tensor, slot: int = 0) -> Tuple[torch.device, torch.dtype, int]:
    """The key of ``like``'s workspace in the thread's cache (``thread_state().cache``)."""
    return (like.device, like.dtype, slot)


def thread_state() -> threading.local:
    """This thread's mixing state: the workspaces, and whatever else holds views into them (cleared together
    by :func:`clear_workspaces`)."""
    return _workspaces


def clear_workspaces() -> None:
    """Free this thread's mixing workspaces (they are otherwise kept for reuse), and the views kept into them."""
    _workspaces.__dict__.clear()


def workspace_bytes() -> int:
    """Bytes held by this thread's mixing workspaces (at most one forward chunk and one backward chunk of
    mixed kernels, or one sample's kernel where that is larger, one backward chunk of 1×1 kernel gradients, and
    two folded pieces of channels_last depthwise input or output gradient, per device and dtype)."""
    cache = getattr(_workspaces, "cache", None) or {}
    return sum(buf.numel() * buf.element_size() for buf in cache.values())


def limits(device_type: str) -> Tuple[int, int, int, int, int]:
    """``(forward chunk elements, backward chunk elements, expert tile elements, per-sample minimum positions,
    per-sample grouped minimum elements)`` for a device type (read at call time: tests change them)."""
    if device_type in CPU_RULES:
        return (FORWARD_CHUNK_ELEMENTS, BACKWARD_CHUNK_ELEMENTS, EXPERT_TILE_ELEMENTS, PER_SAMPLE_MIN_POSITIONS,
                PER_SAMPLE_GROUPED_MIN_ELEMENTS)
    return ACCELERATOR_CHUNK_ELEMENTS, ACCELERATOR_CHUNK_ELEMENTS, _NEVER, _NEVER, _NEVER


def chunk_size(batch: int, kernel_numel: int, budget: int) -> int:
    """How many samples' mixed kernels fit in ``budget`` elements (at least 1, at most ``batch``)."""
    return max(1, min(batch, budget // max(1, kernel_numel)))


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is in the channels_last (4-D) or channels_last_3d (5-D) memory format and not also contiguous
    (other ranks: never)."""
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return False


def kernel_is_one(weight: Tensor) -> bool:
    """Whether the experts ``(K, C_out, C_in/g, *kernel)`` are 1×1 (×1) kernels (read from the shape: indexing
    the tensor would cost tensor operations on every call)."""
    for k in weight.shape[3:]:
        if k != 1:
            return False
    return True


def uses_matmul(weight: Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int) -> bool:
    """Unpadded, stride-1, ungrouped 1×1 kernels: the convolution is a batched matrix product."""
    one = kernel_is_one(weight)
    return one and groups == 1 and not any([p != 0 for p in padding]) and all([s == 1 for s in stride])


def memory_order(weight: Tensor) -> List[int]:
    """The permutation of ``weight``'s dims 1.. that is contiguous (identity unless e.g. channels_last)."""
    dims = list(range(1, weight.dim()))
    if weight.is_contiguous():
        return dims
    order: List[int] = []
    while len(dims) > 0:  # selection sort by decreasing stride (TorchScript has no sort with a key)
        best = 0
        for i in range(1, len(dims)):
            if weight.stride(dims[i]) > weight.stride(dims[best]):
                best = i
        order.append(dims.pop(best))
    return order


def flat_experts(weight: Tensor, order: List[int]) -> Tensor:
    """``weight`` as ``(K, kernel numel)`` in memory order: a view, never a copy of the K kernels."""
    return weight.permute([0] + order).reshape(weight.shape[0], -1)


def unflatten(flat: Tensor, weight: Tensor, order: List[int]) -> Tensor:
    """Rows of ``flat`` (memory order of ``weight``) back to ``(rows, *weight.shape[1:])``, same strides."""
    permuted = flat.reshape([flat.shape[0]] + [weight.shape[d] for d in order])
    inverse = [0] * weight.dim()
    for i in range(len(order)):
        inverse[order[i]] = i + 1
    return permuted.permute(inverse)


# Kernels of at least this many elements are mixed for one sample by scaled adds (``scaled_adds``) instead of
# ``torch.mm``/``torch.mv`` (CPU); ``_NEVER``: never. Which is faster depends on the CPU. On the machines of the
# sessions up to 2026-11-29 (about 10 GB/s from memory) scaled adds streamed large kernels faster (3x3 512->512,
# warm: 3.2 ms against 3.5 ms for mm and 4.4 ms for mv, benchmarks/batch1_parts.py --part mixing), so the
# threshold was 2^18. On the one of 2026-11-29 (AMX-capable Xeon, about three times the bandwidth) the opposite
# held everywhere: the same kernel 1.10 ms by mv against 1.69 ms by scaled adds, and DY-ResNet-18 at batch 1 was
# faster with mv in two A/Bs (README, "Mixing by scaled adds").
SCALED_ADDS_MIN_ELEMENTS = _NEVER
# ... and, for chunks of several samples, kernels of at least this many elements, sample by sample (``_NEVER``:
# never). Inside the 3x3 256->256 layer (589824 elements, chunks of 3 samples, batch 32) scaled adds had been faster
# than torch.mm's (n x K) @ (K x N) in 11 of 12 cells over three runs on the earlier machines, by about 0.1 of
# static's time (the threshold was 2^19); on the machine of 2026-11-29 torch.mm was faster in all four cells, by
# 0.34-1.03 of static's time (benchmarks/mixing.py --part chunk-mix), and DY-ResNet-18's batch-32 inference and
# training step were faster with it in two launches each (README, "Mixing by scaled adds").
SCALED_ADDS_CHUNK_MIN_ELEMENTS = _NEVER


def mix(attention: Tensor, flat: Tensor, weight: Tensor, order: List[int], buf: Optional[Tensor] = None) -> Tensor:
    """The kernels ``attention @ flat`` as ``(rows, *weight.shape[1:])`` with ``weight``'s strides, written into
    ``buf`` when given (no gradient may flow through it then)."""
    if buf is None:
        return unflatten(torch.mm(attention, flat), weight, order)
    out = buf[: attention.shape[0] * flat.shape[1]].view(attention.shape[0], flat.shape[1])
    if not torch.jit.is_scripting():
        rows = attention.shape[0]
        threshold = SCALED_ADDS_MIN_ELEMENTS if rows == 1 else SCALED_ADDS_CHUNK_MIN_ELEMENTS
        if flat.shape[1] >= threshold and not python_dispatch_active():
            weights = attention.tolist()  # buf (so this path) exists only on the CPU: no synchronisation
            for i in range(rows):
                scaled_adds(weights[i], flat, out[i])
            return unflatten(out, weight, order)
        if _compiled_mix(attention, flat, out):
            return unflatten(out, weight, order)
    return unflatten(torch.mm(attention, flat, out=out), weight, order)


@torch.jit.unused
def _compiled_mix(attention: Tensor, flat: Tensor, out: Tensor) -> bool:
    """Mix ``attention @ flat`` into ``out`` with the compiled CPU kernel (``torch.ops.dyconv_cpu.mix_rows``, in
    tiles of a thousand elements, the K experts' rows in one pass: 2-4 times as fast as ``torch.mm``'s product
    with an inner dimension of K on this machine, ``benchmarks/mixing.py --part chunk-mix``) where it is built and
    the tensors suit it (float32 or float64, one dtype, the experts' rows contiguous), no autocast (which computes
    ``mm`` in lower precision) and no Python dispatch mode (``dyconv.profile``'s FLOP counter counts ``mm``);
    ``False`` where it did not."""
    from . import _cpu_kernel  # imports this module

    dtype = flat.dtype
    if dtype not in _cpu_kernel.DTYPES or attention.dtype != dtype or out.dtype != dtype or flat.stride(1) != 1:
        return False
    if flat.device.type != "cpu" or autocast_dtype("cpu") is not None or python_dispatch_active():
        return False
    if not _cpu_kernel.available():
        return False
    torch.ops.dyconv_cpu.mix_rows(attention, flat, out)
    return True


@torch.jit.unused
def scaled_adds(weights: List[float], rows, out: Tensor) -> Tensor:
    """``sum_k weights[k] * rows[k]`` into the 1-D ``out`` by a scaled copy and K - 1 scaled in-place adds (``rows``:
    the K experts as a ``(K, N)`` tensor or a list of K rows). On the CPU this streams large kernels' experts faster
    than ``torch.mm``'s (1 x K) @ (K x N) (3x3 512->512: 1.6-3.2 against 2.3-4.4 ms, 2 threads;
    benchmarks/batch1_parts.py) and is slower below about 2^18 elements, where the extra calls cost more. Used
    only where the weights are Python floats already or cost no synchronisation to read (the CPU)."""
    torch.mul(rows[0], weights[0], out=out)
    for k in range(1, len(weights)):
        out.add_(rows[k], alpha=weights[k])
    return out


def output_spatial(x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int]) -> List[int]:
    """The spatial sizes of a convolution's output (``weight``: ``(K or n, C_out, C_in // groups, *kernel)``)."""
    sizes: List[int] = []
    for i in range(x.dim() - 2):
        span = dilation[i] * (weight.shape[3 + i] - 1) + 1
        sizes.append(max(0, (x.shape[2 + i] + 2 * padding[i] - span) // stride[i] + 1))
    return sizes


def product(sizes: List[int]) -> int:
    """The product of ``sizes`` (1 for none)."""
    result = 1
    for size in sizes:
        result *= size
    return result


def output_positions(x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int]) -> int:
    """Output positions per sample (product of the output's spatial sizes) of a convolution."""
    return product(output_spatial(x, weight, stride, padding, dilation))


def convolves_per_sample(x: Tensor, weight: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                         groups: int, matmul: bool, min_positions: int, grouped_min_elements: int,
                         training: bool) -> bool:
    """Whether each sample gets its own convolution (large outputs) rather than the chunk folded into groups.

    At least ``min_positions`` output positions per sample; for grouped layers without gradients also at least
    ``grouped_min_elements`` input elements per sample (grouped inference on smaller inputs is faster folded).
    """
    if matmul or x.shape[0] == 1:
        return False
    positions = output_positions(x, weight, stride, padding, dilation)
    if positions < min_positions:
        return False
    if training or groups == 1:
        return True
    # the input's elements: a strided layer reads more than it writes (depthwise 144 @56 stride 2, batch 32:
    # 2.1-4.2x static per sample against 4.9-11x folded, benchmarks/mixing.py)
    return product(list(x.shape[1:])) >= grouped_min_elements


def _conv_chunk(x: Tensor, mixed: Tensor, mixed_bias: Optional[Tensor], stride: List[int], padding: List[int],
                dilation: List[int], groups: int, matmul: bool, per_sample: bool = False) -> Tensor:
    """``conv(x[i], mixed[i]) + mixed_bias[i]`` for every sample ``i`` of the chunk: one call, or one
    convolution per sample where ``per_sample``."""
    chunk, out_channels, in_channels = x.shape[0], mixed.shape[1], x.shape[1]
    spatial = list(x.shape[2:])
    if matmul:
        w = mixed.reshape(chunk, out_channels, in_channels)
        cols = x.reshape(chunk, in_channels, -1)  # a view for contiguous and channels_last input
        if is_channels_last(x):
            # (L, C_in) @ (C_in, C_out) per sample writes a channels_last output directly
            if mixed_bias is None:
                out = torch.bmm(cols.transpose(1, 2), w.transpose(1, 2))
            else:
                out = torch.baddbmm(mixed_bias.unsqueeze(1), cols.transpose(1, 2), w.transpose(1, 2))
            return out.reshape([chunk] + spatial + [out_channels]).movedim(-1, 1)
        if mixed_bias is None:
            out = torch.bmm(w, cols)
        else:
            out = torch.baddbmm(mixed_bias.unsqueeze(2), w, cols)
        return out.reshape([chunk, out_channels] + spatial)
    rank = x.dim() - 2
    if per_sample:
        outs: List[Tensor] = []
        for i in range(chunk):
            bi: Optional[Tensor] = None
            if mixed_bias is not None:
                bi = mixed_bias[i]
            outs.append(torch.convolution(x[i : i + 1], mixed[i], bi, stride, padding, dilation, False, [0] * rank,
                                          groups))
        return torch.cat(outs, 0)
    b: Optional[Tensor] = None
    if mixed_bias is not None:
        b = mixed_bias.reshape(-1)
    if not torch.jit.is_scripting():
        if _folds_channels_last(x, groups):
            return _folded_channels_last(x, mixed, b, stride, padding, dilation, groups)
    # reshape, not view: channels_last and other non-contiguous chunks must work (they are copied here)
    out = torch.convolution(x.reshape([1, chunk * in_channels] + spatial),
                            mixed.reshape([chunk * out_channels] + list(mixed.shape[2:])), b, stride, padding,
                            dilation, False, [0] * rank, chunk * groups)
    return out.reshape([chunk, out_channels] + list(out.shape[2:]))


@torch.jit.unused
def _folds_channels_last(x: Tensor, groups: int) -> bool:
    """Whether a folded chunk of ``x`` is convolved in channels_last (:func:`_folded_channels_last`): depthwise
    layers (one input channel per group) with channels_last input, on the CPU."""
    return groups > 1 and x.shape[1] == groups and x.device.type in CPU_RULES and is_channels_last(x)


@torch.jit.unused
def _fold_pieces(x: Tensor, out_spatial: List[int], out_channels: int) -> int:
    """Samples per folded convolution of a channels_last depthwise chunk: as many as keep one piece's input and
    output within ``FOLD_CHUNK_ELEMENTS`` (at least one)."""
    per_sample = x[0].numel() + out_channels * product(out_spatial)
    return max(1, min(x.shape[0], FOLD_CHUNK_ELEMENTS // per_sample))


@torch.jit.unused
def _folded_channels_last(x: Tensor, mixed: Tensor, b: Optional[Tensor], stride: List[int], padding: List[int],
                          dilation: List[int], groups: int) -> Tensor:
    """A depthwise chunk folded into the groups without leaving channels_last.

    Folding ``(n, C, *spatial)`` into ``(1, n * C, *spatial)`` is a view only for contiguous memory; for a
    channels_last chunk the plain fold copies it into the contiguous format, where the CPU's depthwise
    convolution is several times slower than in channels_last, and hands a contiguous output to the rest of a
    channels_last network. Here the chunk is copied to ``(*spatial, n, C)`` memory instead, which *is* a
    channels_last ``(1, n * C, *spatial)`` tensor, convolved with channels_last kernels (the same memory as
    contiguous ones for depthwise kernels), and the output copied back to channels_last ``(n, C_out, *spatial)``.
    Batch 32, MobileNetV2's depthwise layers at 7²-112² (``benchmarks/mixing.py --part depthwise``: "folded CL"
    against "folded CL via C"): faster in 8 of 10 rows in the README's run, e.g. 384 @14 2.36x static against
    4.52x. Backward does the same (:func:`_folded_channels_last_backward`).

    The chunk is convolved in pieces of a few samples (:func:`_fold_pieces`), each copied into a reused
    workspace (a fresh copy of the whole chunk was slower; the pieces keep the workspace bounded whatever the
    batch); a sample that alone exceeds the budget is its own piece, and its fold is a view (no copy).
    """
    chunk, out_channels, rank = x.shape[0], mixed.shape[1], x.dim() - 2
    out_spatial = output_spatial(x, mixed, stride, padding, dilation)
    result = torch.empty([chunk, out_channels] + out_spatial, dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last if rank == 2 else torch.channels_last_3d)
    kernels = _folded_kernels(mixed)
    piece = _fold_pieces(x, out_spatial, out_channels)
    for start in range(0, chunk, piece):
        end = min(start + piece, chunk)
        b_piece: Optional[Tensor] = None
        if b is not None:
            b_piece = b[start * out_channels : end * out_channels]
        out = torch.convolution(_fold_channels_last(x[start:end], 3),
                                kernels[start * out_channels : end * out_channels], b_piece, stride, padding,
                                dilation, False, [0] * rank, (end - start) * groups)
        _unfold_channels_last_into(out, result[start:end])
    return result


@torch.jit.unused
def _folded_channels_last_backward(gy: Tensor, x: Tensor, mixed: Tensor, stride: List[int], padding: List[int],
                                   dilation: List[int], groups: int, grad_x: Optional[Tensor],
                                   need_kernels: bool) -> Optional[Tensor]:
    """Backward of :func:`_folded_channels_last` for one chunk, in the same pieces: the input gradient written
    into ``grad_x`` (the chunk's channels_last slice of the batch's, when given), the per-sample kernel gradients
    returned ``(n * C_out, 1, *kernel)`` when ``need_kernels``. The plain fold's backward copies ``x`` and ``gy``
    to the contiguous format and the input gradient back, and convolves in the contiguous format: MobileNetV2's
    depthwise layers at the training step's sizes, batch 32 (``benchmarks/mixing.py --part depthwise-train``)."""
    chunk, out_channels, rank = x.shape[0], mixed.shape[1], x.dim() - 2
    kernels = _folded_kernels(mixed)
    piece = _fold_pieces(x, list(gy.shape[2:]), out_channels)
    grads: List[Tensor] = []
    for start in range(0, chunk, piece):
        end = min(start + piece, chunk)
        gx, grad_kernels, _ = torch.ops.aten.convolution_backward(
            _fold_channels_last(gy[start:end], 3), _fold_channels_last(x[start:end], 4),
            kernels[start * out_channels : end * out_channels], None, stride, padding, dilation, False, [0] * rank,
            (end - start) * groups, [grad_x is not None, need_kernels, False],
        )
        if grad_x is not None:
            _unfold_channels_last_into(gx, grad_x[start:end])
        if need_kernels:
            grads.append(grad_kernels)
    if not need_kernels:
        return None
    return grads[0] if len(grads) == 1 else torch.cat(grads, 0)


@torch.jit.unused
def _fold_channels_last(x: Tensor, slot: int) -> Tensor:
    """A channels_last ``(n, C, *spatial)`` chunk as a channels_last ``(1, n * C, *spatial)`` tensor: copied to
    ``(*spatial, n, C)`` memory, in the workspace ``slot`` on the CPU (a view for one sample: its memory already
    is that)."""
    chunk, channels, rank = x.shape[0], x.shape[1], x.dim() - 2
    spatial = list(x.shape[2:])
    moved = x.permute(list(range(2, 2 + rank)) + [0, 1])  # (*spatial, n, C)
    if chunk == 1:
        folded = moved.contiguous()  # a view when x is dense (it may be any strided sample)
    else:
        buf = workspace(x.numel(), x, slot)
        folded = moved.contiguous() if buf is None else buf.view(spatial + [chunk, channels]).copy_(moved)
    return folded.view([1] + spatial + [chunk * channels]).permute([0, rank + 1] + list(range(1, rank + 1)))


@torch.jit.unused
def _folded_kernels(mixed: Tensor) -> Tensor:
    """Per-sample depthwise kernels ``(n, C_out, 1, *kernel)`` as the folded convolution's channels_last
    ``(n * C_out, 1, *kernel)`` (the same memory as the contiguous ones)."""
    fmt = torch.channels_last if mixed.dim() == 5 else torch.channels_last_3d
    return mixed.reshape([mixed.shape[0] * mixed.shape[1]] + list(mixed.shape[2:])).contiguous(memory_format=fmt)


@torch.jit.unused
def _unfold_channels_last_into(folded: Tensor, dest: Tensor) -> Tensor:
    """The inverse of :func:`_fold_channels_last`: ``folded`` ``(1, n * C, *spatial)`` in ``(*spatial, n, C)``
    memory copied into the channels_last ``(n, C, *spatial)`` tensor ``dest`` (a fresh tensor or a slice of one,
    rather than ``.contiguous(memory_format=)``: for one sample the view already counts as channels_last, with a
    batch stride that makes ``torch.cat`` of the chunks fall back to the contiguous format)."""
    chunk, channels, rank = dest.shape[0], dest.shape[1], folded.dim() - 2
    spatial = list(folded.shape[2:])
    moved = folded.permute([0] + list(range(2, 2 + rank)) + [1]).reshape(spatial + [chunk, channels])
    return dest.copy_(moved.permute([rank, rank + 1] + list(range(rank))))


def chunked_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                    padding: List[int], dilation: List[int], groups: int, chunk: int,
                    buf: Optional[Tensor] = None, tile_elements: int = 1 << 21,
                    per_sample_positions: int = 512, per_sample_grouped_elements: int = 1 << 17,
                    training: bool = False) -> Tensor:
    """Per-sample convolution, ``chunk`` samples' mixed kernels at a time.

    ``buf``: a scratch buffer of at least ``chunk × kernel numel`` elements to mix into (only where no
    gradient flows through the mixing: it is overwritten chunk after chunk); ``None`` allocates.
    ``tile_elements``, ``per_sample_positions``, ``per_sample_grouped_elements``: :data:`EXPERT_TILE_ELEMENTS`,
    :data:`PER_SAMPLE_MIN_POSITIONS`, :data:`PER_SAMPLE_GROUPED_MIN_ELEMENTS` (arguments because TorchScript
    reads no globals). ``training``: whether this forward is part of a training step (for that choice).
    """
    order = memory_order(weight)
    flat = flat_experts(weight, order)
    a = attention.to(flat.dtype)
    matmul = uses_matmul(weight, stride, padding, dilation, groups)
    batch = x.shape[0]
    tiles = output_tiles(weight, groups, batch, chunk, order, tile_elements)
    if tiles > 1:
        return _tiled_forward(x, weight, bias, a, stride, padding, dilation, tiles, matmul, buf)
    per_sample = convolves_per_sample(x, weight, stride, padding, dilation, groups, matmul, per_sample_positions,
                                      per_sample_grouped_elements, training)
    outs: List[Tensor] = []
    for start in range(0, batch, chunk):
        end = min(start + chunk, batch)
        mixed = mix(a[start:end], flat, weight, order, buf)
        mixed_bias: Optional[Tensor] = None
        if bias is not None:
            mixed_bias = torch.mm(a[start:end], bias)
        outs.append(_conv_chunk(x[start:end], mixed, mixed_bias, stride, padding, dilation, groups, matmul,
                                per_sample))
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs, 0)


def output_tiles(weight: Tensor, groups: int, batch: int, chunk: int, order: List[int], tile_elements: int) -> int:
    """How many output-channel tiles :func:`chunked_forward` uses (1: none).

    Tiles only pay when chunks are single samples of several (each sample would re-read all K experts) and
    the K experts exceed ``tile_elements``; only ungrouped, contiguous-order kernels are tiled.
    """
    if chunk != 1 or batch == 1 or groups != 1 or order[0] != 1:
        return 1
    experts = weight.numel()
    if experts <= tile_elements:
        return 1
    tiles = (experts + tile_elements - 1) // tile_elements
    return min(tiles, weight.shape[1])


def _tiled_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, stride: List[int],
                   padding: List[int], dilation: List[int], tiles: int, matmul: bool, buf: Optional[Tensor]) -> Tensor:
    """Output-channel tiles outer, samples inner: each tile's K experts are read from memory once per group of
    samples whose tile kernels fill one sample's kernel size (the workspace's size); each group is one
    convolution with the group folded into the groups. (Mixing one sample per read re-read the tile from memory
    for every sample: the `dyconv bench` row 3x3 512->512 @7, batch 32, went from 4.7-5.8x static to 3.3-3.6x.)"""
    out_channels = weight.shape[1]
    step = (out_channels + tiles - 1) // tiles
    batch = x.shape[0]
    pieces: List[Tensor] = []
    for c0 in range(0, out_channels, step):
        c1 = min(c0 + step, out_channels)
        w_t = weight[:, c0:c1]
        flat_t = w_t.reshape(weight.shape[0], -1)  # a view: the kernel is contiguous in its output channels
        samples = chunk_size(batch, flat_t.shape[1], weight[0].numel())
        b_t: Optional[Tensor] = None
        if bias is not None:
            b_t = torch.mm(a, bias[:, c0:c1])
        outs: List[Tensor] = []
        for start in range(0, batch, samples):
            end = min(start + samples, batch)
            mixed = mix(a[start:end], flat_t, w_t, list(range(1, weight.dim())), buf)
            bi: Optional[Tensor] = None
            if b_t is not None:
                bi = b_t[start:end]
            outs.append(_conv_chunk(x[start:end], mixed, bi, stride, padding, dilation, 1, matmul))
        pieces.append(torch.cat(outs, 0))
    return torch.cat(pieces, 1)


class _ChunkedDynamicConv(torch.autograd.Function):
    """Forward as :func:`chunked_forward`; backward recomputes each chunk's kernels instead of keeping them."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                padding: List[int], dilation: List[int], groups: int, chunk: int) -> Tensor:
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias if bias is not None else weight.new_empty(0), attention)
        buf = workspace(chunk * weight[0].numel(), weight)
        _, _, tile, positions, grouped = limits(x.device.type)
        out = chunked_forward(x, weight, bias, attention, stride, padding, dilation, groups, chunk, buf,
                              tile, positions, grouped, True)
        return unviewed(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight, bias, attention = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        need_x, need_w, need_b, need_a = ctx.needs_input_grad[:4]
        bias = bias if ctx.has_bias else None
        order = memory_order(weight)
        flat = flat_experts(weight, order)
        a = attention.to(flat.dtype)
        matmul = uses_matmul(weight, stride, padding, dilation, groups)
        batch, rank = x.shape[0], x.dim() - 2
        _, backward_chunk, _, positions, grouped = limits(x.device.type)
        per_sample = convolves_per_sample(x, weight, stride, padding, dilation, groups, matmul, positions, grouped,
                                          True)
        chunk = chunk_size(batch, flat.shape[1], backward_chunk)
        buf = workspace(chunk * flat.shape[1], flat, 1)
        grad_out = grad_out.to(x.dtype)
        grad_x = torch.empty_like(x) if need_x else None
        grad_flat: Optional[Tensor] = None  # the first chunk's product, then accumulated (no zero fill)
        grad_a = torch.empty_like(a) if need_a else None
        grad_bias = torch.zeros_like(bias) if (need_b and bias is not None) else None
        spatial_dims = list(range(2, grad_out.dim()))
        for start in range(0, batch, chunk):
            end = min(start + chunk, batch)
            n = end - start
            a_c, x_c, gy = a[start:end], x[start:end], grad_out[start:end]
            mixed = mix(a_c, flat, weight, order, buf)
            if matmul:
                cols = x_c.reshape(n, x.shape[1], -1)
                gy_cols = gy.reshape(n, gy.shape[1], -1)
                grad_mixed = None
                if need_w or need_a:
                    # per-sample kernel gradients into a reused buffer, like the mixed kernels (MobileNetV2's 1x1
                    # layers at 7² and 14², training step, batch 32, both formats: faster by up to a fifth in five
                    # of six cases, 2 % slower in one, against fresh memory; ad-hoc A/B, 31 interleaved steps)
                    gbuf = workspace(n * mixed.shape[1] * mixed.shape[2], flat, 2)
                    out = None if gbuf is None else gbuf.view(n, mixed.shape[1], mixed.shape[2])
                    grad_mixed = torch.bmm(gy_cols, cols.transpose(1, 2), out=out)
                if grad_x is not None:
                    w = mixed.reshape(n, mixed.shape[1], mixed.shape[2])
                    _bmm_into(w.transpose(1, 2), gy_cols, grad_x[start:end])
            elif per_sample:
                grads: List[Tensor] = []
                for i in range(n):
                    gx, gw, _ = torch.ops.aten.convolution_backward(
                        gy[i : i + 1], x_c[i : i + 1], mixed[i], None, stride, padding, dilation, False,
                        [0] * rank, groups, [grad_x is not None, need_w or need_a, False],
                    )
                    if grad_x is not None:
                        grad_x[start + i : start + i + 1] = gx
                    if need_w or need_a:
                        grads.append(gw)
                grad_mixed = torch.stack(grads) if (need_w or need_a) else None
            elif _folds_channels_last(x_c, groups):
                grad_mixed = _folded_channels_last_backward(gy, x_c, mixed, stride, padding, dilation, groups,
                                                            None if grad_x is None else grad_x[start:end],
                                                            need_w or need_a)
            else:
                in_channels, out_channels = x.shape[1], weight.shape[1]
                gx, grad_mixed, _ = torch.ops.aten.convolution_backward(
                    gy.reshape([1, n * out_channels] + list(gy.shape[2:])),
                    x_c.reshape([1, n * in_channels] + list(x.shape[2:])),
                    mixed.reshape([n * out_channels] + list(weight.shape[2:])),
                    None, stride, padding, dilation, False, [0] * rank, n * groups,
                    [grad_x is not None, need_w or need_a, False],
                )
                if grad_x is not None:
                    grad_x[start:end] = gx.reshape(x_c.shape)
            if grad_mixed is not None:
                # per-sample kernel gradients -> experts: d/dW_k = sum_b a[b,k] dW_b; d/da[b,k] = <dW_b, W_k>
                g = _flatten_like(grad_mixed.reshape(mixed.shape), order)
                if need_w:
                    grad_flat = torch.mm(a_c.t(), g) if grad_flat is None else grad_flat.addmm_(a_c.t(), g)
                if grad_a is not None:
                    grad_a[start:end] = torch.mm(g, flat.t())
            if bias is not None and (grad_bias is not None or grad_a is not None):
                g_bias = gy.sum(spatial_dims).to(bias.dtype)
                if grad_bias is not None:
                    grad_bias.addmm_(a_c.t(), g_bias)
                if grad_a is not None:
                    grad_a[start:end] += torch.mm(g_bias, bias.t())
        grad_weight = unflatten(grad_flat, weight, order) if grad_flat is not None else None
        if grad_a is not None:
            grad_a = grad_a.to(attention.dtype)
        return grad_x, grad_weight, grad_bias, grad_a, None, None, None, None, None


def unviewed(out: Tensor) -> Tensor:
    """``out`` without view bookkeeping, for a custom Function's output: one that is a view (e.g. a reshape of a
    convolution's result) may not be modified in place (e.g. by an in-place activation); the same memory as a
    plain tensor may, and costs no copy."""
    if not out._is_view():
        return out
    owner = torch.empty(0, dtype=out.dtype, device=out.device)
    return owner.set_(out.untyped_storage(), out.storage_offset(), out.shape, out.stride())


def _bmm_into(a: Tensor, b: Tensor, dest: Tensor) -> None:
    """``dest`` (``(n, C, *spatial)``) = ``a @ b`` as ``(n, C, L)``, written in place: for contiguous ``dest`` the
    product, for channels_last its transpose lands directly in ``dest``'s memory (no copy); otherwise copied."""
    if dest.is_contiguous():
        torch.bmm(a, b, out=dest.view(dest.shape[0], dest.shape[1], -1))
    elif is_channels_last(dest):
        torch.bmm(b.transpose(1, 2), a.transpose(1, 2), out=dest.view(dest.shape[0], dest.shape[1], -1).transpose(1, 2))
    else:
        dest.copy_(torch.bmm(a, b).view(dest.shape))


def _flatten_like(t: Tensor, order: List[int]) -> Tensor:
    """``(n, *kernel)`` to ``(n, numel)`` in the experts' memory order (a copy only if ``t``'s order differs)."""
    return t.permute([0] + order).reshape(t.shape[0], -1)


@torch.jit.unused
def chunked_autograd(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                     padding: List[int], dilation: List[int], groups: int, chunk: int) -> Tensor:
    """:func:`chunked_forward` with memory-bounded backward (eager mode only: not scriptable or traceable)."""
    device_type = x.device.type
    dtype = autocast_dtype(device_type)
    if dtype is not None:
        # autocast would not reach the ops that backward runs; cast once here so both run in its dtype
        x, weight, attention = x.to(dtype), weight.to(dtype), attention.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _ChunkedDynamicConv.apply(x, weight, bias, attention, stride, padding, dilation, groups, chunk)
    return _ChunkedDynamicConv.apply(x, weight, bias, attention, stride, padding, dilation, groups, chunk)


def conv_chunked(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                 padding: List[int], dilation: List[int], groups: int) -> Tensor:
    """The ``"chunked"`` strategy (see the module docstring)."""
    if not torch.jit.is_scripting():
        return _conv_chunked_eager(x, weight, bias, attention, stride, padding, dilation, groups)
    # TorchScript reads no module globals: the literal is FORWARD_CHUNK_ELEMENTS' default
    chunk = chunk_size(x.shape[0], weight[0].numel(), 1 << 21)
    return chunked_forward(x, weight, bias, attention, stride, padding, dilation, groups, chunk)


@torch.jit.unused
def _conv_chunked_eager(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor, stride: List[int],
                        padding: List[int], dilation: List[int], groups: int) -> Tensor:
    forward_chunk, _, tile, positions, grouped = limits(x.device.type)
    chunk = chunk_size(x.shape[0], weight[0].numel(), forward_chunk)
    if _needs_grad(x, weight, bias, attention) and not tracing_exporting_or_compiling():
        return chunked_autograd(x, weight, bias, attention, stride, padding, dilation, groups, chunk)
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight, attention = x.to(dtype), weight.to(dtype), attention.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    buf: Optional[Tensor] = None
    training = _needs_grad(x, weight, bias, attention)
    if not training:
        buf = workspace(chunk * weight[0].numel(), weight)
    return chunked_forward(x, weight, bias, attention, stride, padding, dilation, groups, chunk, buf, tile,
                           positions, grouped, training)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype if autocast is on for this device type (``meta`` and the like have none)."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type)


def _needs_grad(x: Tensor, weight: Tensor, bias: Optional[Tensor], attention: Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    if bias is not None and bias.requires_grad:
        return True
    return x.requires_grad or weight.requires_grad or attention.requires_grad


@torch.jit.unused
def python_dispatch_active() -> bool:
    """Whether a Python dispatch mode (e.g. ``FlopCounterMode``, which :func:`dyconv.profile` uses) sees the ops:
    then the one-sample shortcuts, whose ops such a mode may not count, stay off."""
    return _dispatch_stack_len is not None and _dispatch_stack_len() > 0


def tracing_exporting_or_compiling() -> bool:
    """Whether a trace, an export (``torch.export``, ONNX) or ``torch.compile`` is recording this call.

    Every ONNX exporter records by tracing (the TorchScript-based one) or by ``torch.export`` (the dynamo-based
    one, where ``is_compiling`` holds), so ``torch.onnx.is_in_onnx_export()``, which costs two imports per call
    on every layer's hot path, is not asked (tests/test_export.py checks both exporters)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()
