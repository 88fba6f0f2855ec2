"""Batch-1 inference of a dynamic layer with as few tensor operations and as little Python as possible (and, with
the same plan, a depthwise layer's inference on a channels_last batch in one call: :func:`infer_depthwise`).

At batch 1 a small layer's convolution takes 0.1-0.3 ms on the CPU, and inside a network every operation run
between two convolutions costs several times what it costs alone (its code and data are no longer in the
caches): ``benchmarks/batch1_parts.py --part cold-ops``. The general path (attention, then the chunked strategy
with its bookkeeping) runs about twenty operations per layer and reads a dozen module attributes through
``nn.Module.__getattr__``. This one runs seven operations: the input's sum, two
matrix-vector products with a ReLU between them (the attention's linear layers; the mean's 1/n and the
temperature folded into the products' scalars), the softmax, one matrix-vector product that mixes the kernel
straight into reused memory already viewed as the kernel (or, where ``dyconv._chunked.SCALED_ADDS_MIN_ELEMENTS`` is
set, for large kernels a scaled copy and K - 1 scaled adds, which stream the experts faster on some CPUs), and the
convolution; an eighth mixes the bias where there is one. Where the compiled CPU kernel (:mod:`dyconv._cpu_kernel`)
is built, the first six are one call (``one_sample_mix``); for a depthwise layer on channels_last input all seven are
(``one_sample_depthwise``: the attention, then the compiled depthwise convolution, which mixes the sample's kernel
itself; the bench's depthwise rows at batch 1 went from 1.59x / 1.64x static to 1.05x / 0.92x with it, README).
Ungrouped unpadded stride-1 1x1 layers on contiguous or channels_last 2-D input convolve as one matrix product
(:func:`_pointwise`), which on this CPU is faster than PyTorch's 1x1 convolution except for expansions with few
positions (``POINTWISE_CONV_MAX_POSITIONS``).

Where the compiled kernel is built, the plan also has a native twin (``OneSamplePlan``, ``csrc/one_sample.cpp``),
and from a layer's second call on :func:`infer` hands the call straight to it: it checks what :meth:`_Plan.matches`
checks (the same ``(dict, key, member)`` triples, built here), then the dtype, autocast and dispatch modes, and runs
the route (dense kernel, depthwise call, or the mixing call then the product or the convolution) in C++. Where a
check fails, or the dense kernel's rule is not known for the input's shape, it returns ``None`` and the call takes
the Python steps below, which build a new plan where needed, evaluate the rule and call it again. DY-MobileNetV2 at
batch 1 took 3.1 ms less an image with it (a paired A/B against the commit before; README, "Where it stands").

What it reuses from call to call is kept per layer and per thread, next to the workspace it points into
(:func:`dyconv._chunked.thread_state`; :func:`dyconv._chunked.clear_workspaces` drops both): the layer's members
(read from the modules' own ``_parameters``/``_buffers``/``_modules`` dicts, and checked by identity on every
call), the experts as a ``(kernel numel, K)`` matrix, the workspace slice viewed with the kernel's shape and
strides, and the temperature's reciprocal. It is rebuilt when a member, a parameter's storage or layout, the
temperature or the workspace changes; in-place updates of the parameters (an optimizer step,
``load_state_dict``) are seen through the views. Where a member is not a plain parameter (parametrized, pruned),
the attention modules are not the library's own or carry hooks, :func:`infer` declines and the layer takes its
general path.
"""

from __future__ import annotations

import weakref
from typing import List, Optional

import torch
from torch import Tensor, nn

from . import _chunked, _cpu_kernel
from . import functional
from .attention import ExpertAttention, one_sample_logits


class _Plan:
    """One layer's members and reusable views for batch-1 inference (valid while :meth:`matches` holds)."""

    __slots__ = ("w1", "b1", "w2", "b2", "weight", "weight_ptr", "weight_shape", "weight_strides", "bias",
                 "bias_ptr", "temperature", "temperature_ptr", "temperature_version", "inverse_temperature", "dims",
                 "device_type", "key", "order", "experts_t", "rows", "out", "kernel", "bias_t", "flat", "bias_d",
                 "compiled", "experts", "depthwise", "matrix", "members", "empty", "native")

    def __init__(self, layer: nn.Module, router: nn.Module, fc1: nn.Module, fc2: nn.Module, weight: Tensor,
                 bias: Optional[Tensor], temperature: Tensor, base: Optional[Tensor], state):
        # base: the thread's workspace (None off the CPU), from state, the thread's mixing state
        self.w1, self.b1 = fc1._parameters["weight"], fc1._parameters["bias"]
        self.w2, self.b2 = fc2._parameters["weight"], fc2._parameters["bias"]
        self.weight, self.bias, self.temperature = weight, bias, temperature
        self.device_type = weight.device.type
        self.dims = [0] + list(range(2, weight.dim() - 1))  # a batched input's batch and spatial dims
        # the workspace's key in the thread's cache (dyconv._chunked.workspace_base); none off the CPU
        self.key = None if base is None else _chunked.workspace_key(weight)
        self.weight_ptr, self.weight_shape, self.weight_strides = weight.data_ptr(), weight.shape, weight.stride()
        self.bias_ptr = None if bias is None else bias.data_ptr()
        # an inference tensor (a layer built under torch.inference_mode) has no version counter: its temperature
        # is then divided by on every call instead of being read once
        self.temperature_ptr = temperature.data_ptr()
        self.temperature_version = None if temperature.is_inference() else temperature._version
        self.inverse_temperature = None if temperature.is_inference() else 1.0 / float(temperature)
        experts = weight.detach()
        self.order = _chunked.memory_order(experts)
        flat = _chunked.flat_experts(experts, self.order)  # (K, kernel numel), a view in memory order
        self.experts_t = flat.t()
        numel = flat.shape[1]
        # large kernels, where enabled: a scaled copy and K - 1 scaled adds, which stream the experts faster than
        # one product on some CPUs (dyconv._chunked.SCALED_ADDS_MIN_ELEMENTS; off by default)
        self.rows: Optional[List[Tensor]] = None
        if base is not None and numel >= _chunked.SCALED_ADDS_MIN_ELEMENTS:
            self.rows = [flat[k] for k in range(flat.shape[0])]
        self.out = None if base is None else base[:numel]
        self.kernel = None if base is None else _chunked.unflatten(self.out.view(1, numel), experts, self.order)[0]
        self.bias_t = None if bias is None else bias.detach().t()
        # the compiled CPU kernel computes the attention and mixes in one call (dyconv._cpu_kernel.one_sample_mix)
        self.flat, self.bias_d = flat, None if bias is None else bias.detach()
        self.compiled = (self.out is not None and self.rows is None and flat.is_contiguous()
                         and _cpu_kernel.one_sample_mix_applies(self.w1, self.b1, self.w2, self.b2, self.bias_d))
        self.experts = experts  # for the compiled kernels that mix inside the convolution
        # a depthwise layer's experts (K, C, 1, *kernel): one_sample_depthwise, where the input is channels-innermost
        self.depthwise = self.compiled and experts.dim() >= 4 and experts.shape[2] == 1
        # a 1x1 kernel on the CPU as its (C_out, C_in) matrix, for _pointwise
        self.matrix = None
        if self.kernel is not None and all(s == 1 for s in experts.shape[3:]):
            self.matrix = self.kernel.view(experts.shape[1], experts.shape[2])
        # what must stay as it is for the plan to hold: each (dict, key, member) with dict.get(key) is member, and
        # dicts that must stay empty (the attention's hooks); checked by matches, and by the native plan
        self.members = [(layer._parameters, "weight", weight), (layer._parameters, "bias", bias),
                        (layer._buffers, "temperature", temperature), (layer._modules, "router", router),
                        (router._modules, "fc1", fc1), (router._modules, "fc2", fc2),
                        (fc1._parameters, "weight", self.w1), (fc1._parameters, "bias", self.b1),
                        (fc2._parameters, "weight", self.w2), (fc2._parameters, "bias", self.b2),
                        # the limits the route reads (tests change them)
                        (vars(_cpu_kernel), "DENSE_MAX_POSITIONS", _cpu_kernel.DENSE_MAX_POSITIONS),
                        (globals(), "POINTWISE_CONV_MAX_POSITIONS", POINTWISE_CONV_MAX_POSITIONS)]
        if self.key is not None:
            self.members.append((state.cache, self.key, base))
        self.empty = [router._forward_hooks, router._forward_pre_hooks]
        # the compiled plan (csrc/one_sample.cpp), which checks the same and runs the layer in one call
        self.native = None
        plan_type = _cpu_kernel.one_sample_plan_type() if self.compiled else None
        if plan_type is not None:
            self.native = plan_type(self.members, self.empty, weight, bias, temperature, self.inverse_temperature,
                                    self.w1, self.b1, self.w2, self.b2, experts, flat, self.out, self.kernel,
                                    self.matrix, self.bias_d, self.depthwise, POINTWISE_CONV_MAX_POSITIONS)

    def matches(self, weight: Tensor) -> bool:
        """Whether the plan still holds for its layer, whose weight parameter is now ``weight``."""
        for members, key, member in self.members:
            if members.get(key) is not member:
                return False
        if any(self.empty):
            return False  # hooks added since: the general path calls the router
        if self.weight_ptr != weight.data_ptr() or self.weight_shape != weight.shape:
            return False
        bias, temperature = self.bias, self.temperature
        if self.weight_strides != weight.stride() or (bias is not None and self.bias_ptr != bias.data_ptr()):
            return False
        if self.temperature_ptr != temperature.data_ptr():
            return False
        return self.temperature_version is None or self.temperature_version == temperature._version


# 1x1 expansions (more output than input channels) with at most this many output positions keep PyTorch's
# convolution at batch 1; the other ungrouped unpadded stride-1 1x1 layers are one matrix product (_pointwise).
# On this machine's CPU PyTorch's 1x1 convolution at batch 1 took up to 3.8 times as long as the product: over
# MobileNetV2's 1x1 shapes at 224, 4.4 ms against 2.1 ms on contiguous input and 2.6 ms against 1.8 ms on
# channels_last input (5.9 / 3.0 and 4.2 / 2.9 in an earlier run); the four expansions at 14x14 and 7x7 (64->384,
# 96->576, 160->960, 320->1280) were the only ones where the product was slower, by 2-8 % (6-22 % in the earlier
# run) (benchmarks/batch1_parts.py --part pointwise; README, "Batch 1 without gradients").
POINTWISE_CONV_MAX_POSITIONS = 196


def _pointwise(x: Tensor, matrix: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
               groups: int) -> Optional[Tensor]:
    """An ungrouped unpadded stride-1 1x1 convolution of the one-sample batch ``x`` as one matrix product with the
    kernel's ``(C_out, C_in)`` ``matrix`` (plus ``bias``), into an output laid out as the convolution's
    (contiguous, or channels_last for channels_last 2-D input); ``None`` where these do not hold, ``x`` is laid
    out otherwise, or the layer is an expansion with few positions (``POINTWISE_CONV_MAX_POSITIONS``)."""
    if groups != 1 or any(s != 1 for s in stride) or any(p != 0 for p in padding):
        return None
    c_in, c_out = x.shape[1], matrix.shape[0]
    positions = x.numel() // c_in
    if c_out > c_in and positions <= POINTWISE_CONV_MAX_POSITIONS:
        return None
    if x.is_contiguous():
        y = torch.empty([1, c_out] + list(x.shape[2:]), dtype=x.dtype, device=x.device)
        columns, out = x.view(c_in, positions), y.view(c_out, positions)
        if bias is None:
            torch.mm(matrix, columns, out=out)
        else:
            torch.addmm(bias.unsqueeze(1), matrix, columns, out=out)
        return y
    if not x.is_contiguous(memory_format=torch.channels_last):
        return None
    h, w = x.shape[2], x.shape[3]
    y = torch.empty_strided((1, c_out, h, w), (positions * c_out, 1, w * c_out, c_out), dtype=x.dtype,
                            device=x.device)
    rows, out = x.as_strided((positions, c_in), (c_in, 1)), y.as_strided((positions, c_out), (c_out, 1))
    if bias is None:
        torch.mm(rows, matrix.t(), out=out)
    else:
        torch.addmm(bias, rows, matrix.t(), out=out)
    return y


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _plain_attention(router: nn.Module) -> bool:
    """The library's attention, without hooks of its own, with plain parameters in its linear layers (what
    :func:`infer` computes inline; like :class:`dyconv.attention.ExpertAttention`, from the linear layers'
    parameters, not by calling them)."""
    if type(router).forward is not ExpertAttention.forward or _hooked(router):
        return False
    for name in ("fc1", "fc2"):
        fc = router._modules.get(name)
        if fc is None:
            return False
        if "weight" not in fc._parameters or fc._parameters.get("bias") is None:
            return False
    return True


def _plan(layer: nn.Module) -> Optional[_Plan]:
    weight = layer._parameters.get("weight")
    if weight is None:  # parametrized or pruned
        return None
    state = _chunked.thread_state()
    plans = getattr(state, "one_sample_plans", None)
    if plans is None:
        plans = weakref.WeakKeyDictionary()  # a layer's entry goes with the layer
        state.one_sample_plans = plans
    plan = plans.get(layer)
    if plan is not None and plan.matches(weight):
        return plan
    params, router = layer._parameters, layer._modules.get("router")
    bias, temperature = params.get("bias"), layer._buffers.get("temperature")
    if "bias" not in params or temperature is None or router is None or not _plain_attention(router):
        return None  # a parametrized or pruned member, or other attention modules: the general path
    if weight.is_meta:
        return None  # no values (the temperature's reciprocal is read as a number)
    fc1, fc2 = router._modules["fc1"], router._modules["fc2"]
    dtype = weight.dtype
    if any(p.dtype != dtype for p in (bias, fc1._parameters["weight"], fc2._parameters["weight"]) if p is not None):
        return None  # mixed dtypes: the general path (which raises where the operations do)
    base = _chunked.workspace_base(weight.numel() // weight.shape[0], weight)
    with torch.inference_mode(False):  # normal views, writable in and out of inference mode
        plan = _Plan(layer, router, fc1, fc2, weight, bias, temperature, base, state)
    plans[layer] = plan
    return plan


def infer(layer: nn.Module, x: Tensor, stride: List[int], padding: List[int], dilation: List[int],
          groups: int) -> Optional[Tensor]:
    """The layer's output for the one-sample batch ``x`` ``(1, C_in, *spatial)``, or ``None`` where this path
    does not apply: members that are not plain parameters or modules (see the module's docstring), parameters of
    another dtype than ``x`` or than each other (their dtypes are checked when the views are made; the conv
    weight's on every call), autocast (which casts ``addmm``'s inputs but not ``addmv``'s) or a Python dispatch
    mode (``FlopCounterMode``, which :func:`dyconv.profile` uses, does not count ``addmv``). No gradient may be
    needed: on the CPU the kernel is written into the thread's reused workspace."""
    plans = getattr(_chunked.thread_state(), "one_sample_plans", None)
    if plans is not None:  # the native plan checks and runs the layer in one call
        plan = plans.get(layer)
        if plan is not None and plan.native is not None:
            y = plan.native.run(x, stride, padding, dilation, groups, -1)
            if y is not None:
                return y
    plan = _plan(layer)
    if plan is None or x.dtype != plan.weight.dtype or _chunked.python_dispatch_active():
        return None
    if _chunked.autocast_dtype(plan.device_type) is not None:
        return None
    if plan.native is not None:
        # where the layers take "dense_kernel" (ungrouped stride-1 layers, kernels larger than 1x1, small outputs;
        # grouped layers, MobileNetV2's many depthwise ones, skip the rule's work): the attention, then the compiled
        # kernel that mixes inside the convolution's tiles. The native plan remembers the rule for x's shape and
        # these arguments (the rule's dozen calls cost tens of microseconds inside a network, their code evicted by
        # the convolution before), and DENSE_MAX_POSITIONS is one of its members.
        dense = groups == 1 and functional._dense_kernel_suits(x, plan.experts, list(stride), list(padding),
                                                               list(dilation), 1)
        return plan.native.run(x, stride, padding, dilation, groups, int(dense))
    # PyTorch operators: softmax(fc2(relu(fc1(mean(x)))) / T), 1/T folded into fc2's product
    if plan.inverse_temperature is None:
        logits = one_sample_logits(x, plan.w1, plan.b1, plan.w2, plan.b2, 1.0, plan.dims) / plan.temperature
    else:
        logits = one_sample_logits(x, plan.w1, plan.b1, plan.w2, plan.b2, plan.inverse_temperature, plan.dims)
    attention = torch.softmax(logits, 0)
    if plan.out is None:  # no workspace (not the CPU): a fresh kernel
        kernel = _chunked.unflatten(torch.mv(plan.experts_t, attention).unsqueeze(0), plan.weight, plan.order)[0]
    else:
        if plan.rows is None:
            torch.mv(plan.experts_t, attention, out=plan.out)
        else:
            _chunked.scaled_adds(attention.tolist(), plan.rows, plan.out)  # a workspace: the CPU, no sync
        kernel = plan.kernel
    mixed_bias = None if plan.bias_t is None else torch.mv(plan.bias_t, attention)
    if plan.matrix is not None:
        y = _pointwise(x, plan.matrix, mixed_bias, stride, padding, groups)
        if y is not None:
            return y
    return functional.conv(x, kernel, mixed_bias, stride, padding, dilation, groups)


def infer_depthwise(layer: nn.Module, x: Tensor, stride: List[int], padding: List[int], dilation: List[int],
                    groups: int) -> Optional[Tensor]:
    """The output of a depthwise layer for a batch ``x`` on channels_last CPU memory without gradients, in one call
    of the compiled kernel (``torch.ops.dyconv_cpu.depthwise_inference``: each sample's attention, computed as at
    batch 1, then its kernel and convolution while its input is still in the core's caches; the general path reads
    the input twice from memory, once for the attention's mean and once for the convolution), or ``None`` where
    the layer's plan (its members, dtypes, autocast, dispatch modes: :func:`infer`) or the depthwise kernel
    (:func:`dyconv._cpu_kernel.applies`) does not apply."""
    weight = layer._parameters.get("weight")
    if weight is None or not _cpu_kernel.applies(x, weight, groups):  # also autocast and dispatch modes
        return None
    plan = _plan(layer)
    if plan is None or not plan.depthwise or x.dtype != plan.weight.dtype:
        return None
    scale = plan.inverse_temperature
    if scale is None:
        scale = 1.0 / float(plan.temperature)
    return torch.ops.dyconv_cpu.depthwise_inference(x, plan.w1, plan.b1, plan.w2, plan.b2, scale, plan.experts,
                                                    plan.bias_d, stride, padding, dilation)
