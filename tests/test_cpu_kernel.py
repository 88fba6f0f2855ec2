"""The compiled CPU kernel (``dyconv._cpu_kernel``): the ``"depthwise_kernel"`` strategy against the per-sample
``nn.ConvNd`` reference in float64, forward and every gradient, over a grid of depthwise layers in 1-D, 2-D and
3-D; when the layers pick it; its errors; the fallback without it; batch-1 inference through its one_sample_mix."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dyconv import DynamicConv2d, _cpu_kernel
from dyconv.functional import select_strategy
from op_calls import top_level_ops
from reference import TOL, per_sample_reference
from test_functional import LAYER, SPATIAL, assert_gradients_match_loop, run

CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, dilation=2, padding=2),
    dict(kernel_size=5, stride=3, bias=False),
    dict(kernel_size=2, padding="same", padding_mode="reflect"),  # asymmetric: padded before the kernel
    dict(kernel_size=3, padding=1, padding_mode="circular"),
    dict(kernel_size=1, stride=2),
]
CHANNELS = 6

needs_kernel = pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("c++") is None,
    reason="the kernel is built with a C++ compiler on Linux (elsewhere the layers use the PyTorch strategies)")


@pytest.fixture(autouse=True)
def _kernel_loaded():
    """The kernel built and loaded before every test, so that the tests calling its ops directly pass alone as in
    the file's order (before, they relied on an earlier test having loaded it)."""
    if sys.platform == "linux" and shutil.which("c++") is not None:
        _cpu_kernel.available()


def channels_innermost(x):
    """``x`` with the same values, its memory ``(B, *spatial, C)``."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def layer_and_input(rank, case, batch, layout):
    layer = LAYER[rank](CHANNELS, CHANNELS, groups=CHANNELS, **case, num_experts=3, temperature=2.0,
                        dtype=torch.float64)
    x = torch.randn(batch, CHANNELS, *SPATIAL[rank], dtype=torch.float64)
    if layout == "channels_last":
        x = channels_innermost(x)
    return layer, x


@needs_kernel
def test_kernel_builds_here():
    """On Linux with a C++ compiler (this machine and CI) the kernel must build: a failed build would only warn
    and fall back, and every test below would silently test the fallback."""
    assert _cpu_kernel.available(), _cpu_kernel.unavailable_reason()


@needs_kernel
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference(rank, case, batch, layout):
    layer, x = layer_and_input(rank, case, batch, layout)
    x.requires_grad_()
    out = run(layer, x, "depthwise_kernel")
    torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
    assert out.movedim(1, -1).is_contiguous()  # the output keeps the channels innermost
    assert_gradients_match_loop(layer, x, out)


@needs_kernel
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_float32_against_float64_reference(rank):
    layer, x = layer_and_input(rank, CASES[1], 4, "channels_last")
    expected = per_sample_reference(layer, x)
    layer, x = layer.float(), x.float()
    torch.testing.assert_close(run(layer, x, "depthwise_kernel"), expected.float(), **TOL[torch.float32])


@needs_kernel
def test_gradients_for_a_subset_of_inputs():
    """Backward asked only for some inputs (frozen experts, an input without gradient) gives those, equal to the
    reference's."""
    layer, x = layer_and_input(2, CASES[0], 3, "channels_last")
    assert_frozen_experts_gradients_match_loop(layer, x, "depthwise_kernel")


def assert_frozen_experts_gradients_match_loop(layer, x, strategy):
    """With the experts frozen and ``x`` needing no gradient, ``strategy``'s gradients for the biases and the router
    equal the ``"loop"`` strategy's."""
    layer.weight.requires_grad_(False)
    out = run(layer, x, strategy)
    ref = run(layer, x, "loop")
    params = [layer.bias, *layer.router.parameters()]
    for g, r in zip(torch.autograd.grad(out.sin().sum(), params), torch.autograd.grad(ref.sin().sum(), params)):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


@needs_kernel
def test_output_may_be_modified_in_place():
    """An in-place activation after the layer (torchvision's ReLU6(inplace=True)) must work: the Function's
    output is a plain tensor, not a view."""
    layer, x = layer_and_input(2, CASES[0], 2, "channels_last")
    x.requires_grad_()
    out = run(layer, x, "depthwise_kernel")
    torch.nn.functional.relu6(out, inplace=True).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@needs_kernel
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_layers_pick_it_for_channels_last_depthwise_input(rank):
    layer, x = layer_and_input(rank, CASES[0], 4, "channels_last")
    padding = [1] * rank
    assert select_strategy(x, layer.weight, padding, CHANNELS, layer.stride, layer.dilation) == "depthwise_kernel"
    assert select_strategy(x.contiguous(), layer.weight, padding, CHANNELS, layer.stride, layer.dilation) == "chunked"
    # not for grouped layers that are not depthwise, nor float16, nor under autocast, nor on meta tensors
    w2 = torch.zeros(3, CHANNELS, 2, *layer.kernel_size, dtype=torch.float64)
    assert select_strategy(x, w2, padding, CHANNELS // 2, layer.stride, layer.dilation) == "chunked"
    assert select_strategy(x.half(), layer.weight.half(), padding, CHANNELS, layer.stride,
                           layer.dilation) == "chunked"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert select_strategy(x, layer.weight, padding, CHANNELS, layer.stride, layer.dilation) == "chunked"
    assert select_strategy(x.to("meta"), layer.weight.to("meta"), padding, CHANNELS, layer.stride,
                           layer.dilation) == "chunked"
    # and through the layer: the reference's values and gradients
    x.requires_grad_()
    out = layer(x)
    torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
    assert_gradients_match_loop(layer, x, out)


def test_errors_name_the_bad_value():
    layer = DynamicConv2d(4, 8, 3, groups=4, num_experts=3)
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(ValueError, match="depthwise layer.*groups=4, input channels 4, weight \\(3, 8, 1, 3, 3\\)"):
        run(layer, x, "depthwise_kernel")
    layer = DynamicConv2d(4, 4, 3, groups=4, num_experts=3).half()
    with pytest.raises(ValueError, match="float32 or float64.*dtype=torch.float16"):
        run(layer, x.half(), "depthwise_kernel")


def test_falls_back_without_the_kernel(tmp_path):
    """With DYCONV_CPU_KERNEL=0 (as where no compiler is found) the kernel is unavailable, the layers use the
    chunked strategy and give the reference's values; asking for the strategy by name is a clear error."""
    script = tmp_path / "fallback.py"
    script.write_text(
        "import torch\n"
        "from dyconv import DynamicConv2d, _cpu_kernel\n"
        "from dyconv.functional import dynamic_conv, select_strategy\n"
        "from reference import per_sample_reference\n"
        "layer = DynamicConv2d(6, 6, 3, padding=1, groups=6, dtype=torch.float64)\n"
        "x = torch.randn(3, 6, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)\n"
        "assert not _cpu_kernel.available() and _cpu_kernel.unavailable_reason() == 'DYCONV_CPU_KERNEL=0'\n"
        "assert select_strategy(x, layer.weight, [1, 1], 6, [1, 1], [1, 1]) == 'chunked'\n"
        "torch.testing.assert_close(layer(x), per_sample_reference(layer, x), rtol=1e-10, atol=1e-10)\n"
        "try:\n"
        "    dynamic_conv(x, layer.weight, None, torch.full((3, 4), 0.25, dtype=torch.float64), [1, 1],\n"
        "                 [1, 1, 1, 1], [1, 1], 6, strategy='depthwise_kernel')\n"
        "except RuntimeError as e:\n"
        "    assert 'not available (DYCONV_CPU_KERNEL=0)' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n")
    tests = Path(__file__).parent
    env = dict(os.environ, DYCONV_CPU_KERNEL="0",
               PYTHONPATH=os.pathsep.join([str(tests.parent / "src"), str(tests), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@needs_kernel
def test_not_under_a_python_dispatch_mode():
    """Under a Python dispatch mode (dyconv.profile counts MAdds with FlopCounterMode) the layers keep to PyTorch
    operators, whose FLOPs the mode sees: the kernel's work would be invisible to it."""
    from torch.utils.flop_counter import FlopCounterMode

    layer, x = layer_and_input(2, CASES[0], 4, "channels_last")
    assert select_strategy(x, layer.weight, [1, 1], CHANNELS, layer.stride, layer.dilation) == "depthwise_kernel"
    with FlopCounterMode(display=False) as counter:
        assert select_strategy(x, layer.weight, [1, 1], CHANNELS, layer.stride, layer.dilation) == "chunked"
        layer(x)
    # at least the depthwise convolution's 2 x 9 FLOPs per output element (the attention alone has far fewer)
    assert counter.get_total_flops() >= 2 * 9 * x.shape[0] * CHANNELS * 9 * 10


@needs_kernel
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [True, False])
def test_batch1_inference_in_one_call_float32(layout, bias):
    """Batch-1 inference with the attention and the mixing in the kernel's one call (dyconv._one_sample) in float32,
    on a large input (its sum accumulated in double), against the float64 reference; the float64 case is in
    test_layers.py (the one_sample_route fixture)."""
    from dyconv._chunked import thread_state

    layer = DynamicConv2d(24, 40, 3, padding=1, bias=bias, num_experts=4, temperature=3.0, dtype=torch.float64)
    x = torch.randn(1, 24, 96, 80, dtype=torch.float64) + 0.5
    expected = per_sample_reference(layer.eval(), x).float()
    layer, x = layer.float(), x.float()
    if layout == "channels_last":
        layer, x = layer.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = layer(x)
    assert thread_state().one_sample_plans[layer].compiled
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


# channel counts whose vectors (16 float32 or 8 float64 lanes with AVX-512, 8 or 4 with AVX2) leave every remainder
# of the kernel's blocks of four vectors (0-3) and channels past the last whole vector, in both dtypes
VECTOR_CHANNELS = [13, 27, 40, 85, 117]


def compiled_ops(fn):
    """``fn()``'s result (without gradients) and the compiled kernel's operators it called directly."""
    with torch.no_grad():
        out, ops = top_level_ops(fn)
    return out, [op for op in ops if op.startswith("dyconv_cpu::")]


@needs_kernel
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", [c for c in CASES if c.get("padding_mode", "zeros") == "zeros"], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_batch1_depthwise_in_one_call(rank, case, bias):
    """Batch-1 inference of a depthwise layer on channels-innermost input: the attention and the depthwise kernel in
    one call (``one_sample_depthwise``), against the float64 reference; contiguous input keeps the mix-then-convolve
    call."""
    case = dict(case, bias=bias and case.get("bias", True))
    layer, x = layer_and_input(rank, case, 1, "channels_last")
    layer.eval()
    out, calls = compiled_ops(lambda: layer(x))
    assert calls == ["dyconv_cpu::one_sample_depthwise"]
    torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
    assert out.movedim(1, -1).is_contiguous()  # channels innermost, as the input
    out.relu_()  # a plain tensor, not a view: in-place activations work
    out, calls = compiled_ops(lambda: layer(x.contiguous()))
    torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
    assert calls == ["dyconv_cpu::one_sample_mix"]


def on_threads(threads, fn):
    """``fn()`` run with ``threads`` intra-op threads (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", [c for c in CASES if c.get("padding_mode", "zeros") == "zeros"], ids=str)
@pytest.mark.parametrize("batch", [2, 3, 5])
def test_batch_depthwise_inference_in_one_call(rank, case, batch):
    """Inference without gradients of a depthwise layer on a channels-innermost batch: every sample's attention and
    the depthwise kernel in one call (``depthwise_inference``), on two threads: batches 2 and 5 sample by sample
    (the busiest thread at most 5/4 of the mean), batch 3 in two phases (the attention, then the rows); against the
    float64 reference. With gradients, or on contiguous input, the layer keeps its general path."""
    layer, x = layer_and_input(rank, case, batch, "channels_last")
    layer.eval()
    expected = per_sample_reference(layer, x)
    out, calls = on_threads(2, lambda: compiled_ops(lambda: layer(x)))
    assert calls == ["dyconv_cpu::depthwise_inference"]
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    assert out.movedim(1, -1).is_contiguous()  # channels innermost, as the input
    out.relu_()  # a plain tensor, not a view: in-place activations work
    out, ops = top_level_ops(lambda: layer(x))  # gradients enabled
    assert "dyconv_cpu::depthwise_inference" not in ops
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    out, calls = compiled_ops(lambda: layer(x.contiguous()))
    assert "dyconv_cpu::depthwise_inference" not in calls
    torch.testing.assert_close(out, expected, **TOL[torch.float64])


@needs_kernel
@pytest.mark.parametrize("channels", VECTOR_CHANNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("conv", [dict(padding=1), dict(stride=2, padding=1), dict(stride=2, dilation=2, padding=2)],
                         ids=str)
def test_batch_depthwise_inference_every_vector_block(channels, dtype, conv):
    """``depthwise_inference`` for channel counts reaching every block of the kernel's register tiles and the
    channels past them, and rows holding several runs of positions whose every kernel column reads inside the row,
    the first not at the row's start, and a rest (stride 1: 9 of 11 and 28 of 30 positions; stride 2: 4 of 6, 14 of
    15, 13 of 15), in both schedules (batches 3 and 4 on two threads), against the float64 reference."""
    layer = DynamicConv2d(channels, channels, 3, groups=channels, **conv, num_experts=5, temperature=2.0,
                          dtype=torch.float64).eval()
    for spatial, batch in (((9, 11), 3), ((31, 30), 4)):
        x = channels_innermost(torch.randn(batch, channels, *spatial, dtype=torch.float64) + 0.5)
        expected = per_sample_reference(layer, x).to(dtype)
        out, calls = on_threads(2, lambda: compiled_ops(lambda: layer.to(dtype)(x.to(dtype))))
        assert calls == ["dyconv_cpu::depthwise_inference"]
        torch.testing.assert_close(out, expected, **TOL[dtype])
        layer = layer.double()


def depthwise_call(batch):
    """Arguments of the compiled depthwise calls with the attention (``one_sample_depthwise``,
    ``depthwise_inference``) for a 3x3 layer of 6 channels, 3 experts, on ``batch`` channels_last 5x5 samples: ``x``,
    the attention's ``w1, b1, w2, b2``, the experts, and stride, padding and dilation."""
    x = channels_innermost(torch.randn(batch, 6, 5, 5))
    w1, b1, w2, b2 = torch.randn(4, 6), torch.randn(4), torch.randn(3, 4), torch.randn(3)
    return x, w1, b1, w2, b2, torch.randn(3, 6, 1, 3, 3), ([1, 1], [1, 1], [1, 1])


@needs_kernel
@pytest.mark.parametrize("op, batch, experts_message", [
    ("one_sample_depthwise", 1, "experts must be \\(K, C, 1, \\*kernel\\) with C = 6"),
    ("depthwise_inference", 2, "experts must be \\(3, 6, 1, \\*kernel\\).*\\[3, 5, 1, 3, 3\\]")])
def test_depthwise_calls_with_the_attention_check_their_arguments(op, batch, experts_message):
    call = getattr(torch.ops.dyconv_cpu, op)
    x, w1, b1, w2, b2, experts, args = depthwise_call(batch)
    assert call(x, w1, b1, w2, b2, 1.0, experts, None, *args).shape == x.shape
    with pytest.raises(RuntimeError, match="channels innermost"):
        call(x.contiguous(), w1, b1, w2, b2, 1.0, experts, None, *args)
    with pytest.raises(RuntimeError, match="shapes do not fit.*fc1 \\[4, 5\\]"):
        call(x, torch.randn(4, 5), b1, w2, b2, 1.0, experts, None, *args)
    with pytest.raises(RuntimeError, match=experts_message):
        call(x, w1, b1, w2, b2, 1.0, torch.randn(3, 5, 1, 3, 3), None, *args)
    if op == "one_sample_depthwise":
        with pytest.raises(RuntimeError, match="one sample.*\\[2, 6, 5, 5\\]"):
            call(channels_innermost(torch.randn(2, 6, 5, 5)), w1, b1, w2, b2, 1.0, experts, None, *args)
    else:
        with pytest.raises(RuntimeError, match="bias must be \\(3, 6\\).*\\[3, 5\\]"):
            call(x, w1, b1, w2, b2, 1.0, experts, torch.randn(3, 5), *args)


@needs_kernel
@pytest.mark.parametrize("channels", VECTOR_CHANNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_vector_block_of_the_depthwise_kernel(channels, dtype):
    """Channel counts reaching every block of the forward's and backward's register tiles and the channels past them,
    forward and gradients of the strategy at batch 3 (against the float64 ``"loop"`` strategy's), and the batch-1
    call, whose attention sums the input in runs of 64 positions over two blocks (2350 positions: a partial run) and
    computes the linear layers four rows at a time (hidden width channels // 4, five experts: whole groups and a
    remainder), against the float64 reference."""
    layer = DynamicConv2d(channels, channels, 3, padding=1, groups=channels, num_experts=5, temperature=2.0,
                          dtype=torch.float64)
    for spatial, batch in (((9, 11), 3), ((50, 47), 1)):
        x = channels_innermost(torch.randn(batch, channels, *spatial, dtype=torch.float64) + 0.5)
        expected = per_sample_reference(layer, x).to(dtype)
        ml, mx = layer.to(dtype), x.to(dtype)
        if batch > 1:
            mx.requires_grad_()
            out = run(ml, mx, "depthwise_kernel")
            torch.testing.assert_close(out, expected, **TOL[dtype])
            params = [mx, ml.weight, ml.bias, *ml.router.parameters()]
            grads = torch.autograd.grad(out.sin().sum(), params)
            layer, x = layer.double(), x.requires_grad_()
            params = [x, layer.weight, layer.bias, *layer.router.parameters()]
            expected_grads = torch.autograd.grad(run(layer, x, "loop").sin().sum(), params)
            for g, e in zip(grads, expected_grads):
                torch.testing.assert_close(g, e.to(dtype), **TOL[dtype])
        else:
            out, calls = compiled_ops(lambda: ml.eval()(mx))
            assert calls == ["dyconv_cpu::one_sample_depthwise"]
            torch.testing.assert_close(out, expected, **TOL[dtype])
        layer = layer.double()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("experts_count", [1, 2, 4, 5])
def test_one_sample_mix_mixes_every_element(experts_count, dtype):
    """one_sample_mix's kernel, out = attention @ experts, for kernels of several of the parallel loop's grains
    (2^14 elements) and a tail (the K = 4 case is one pass over the four experts at once, the others a pass per
    expert), against the float64 product with the attention the kernel computes (one_sample_attention, the same
    arithmetic); the mixed bias likewise."""
    torch.manual_seed(0)
    K, n, c_out = experts_count, 2 * (1 << 14) + 37, 7
    x = torch.randn(1, 6, 5, 5, dtype=dtype)
    w1, b1 = torch.randn(4, 6, dtype=dtype), torch.randn(4, dtype=dtype)
    w2, b2 = torch.randn(K, 4, dtype=dtype), torch.randn(K, dtype=dtype)
    experts, out, bias = torch.randn(K, n, dtype=dtype), torch.full((n,), float("nan"), dtype=dtype), \
        torch.randn(K, c_out, dtype=dtype)
    mixed_bias = torch.ops.dyconv_cpu.one_sample_mix(x, w1, b1, w2, b2, 0.5, experts, out, bias)
    attention = torch.ops.dyconv_cpu.one_sample_attention(x, w1, b1, w2, b2, 0.5).double()
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), (attention @ experts.double())[0], **tol)
    torch.testing.assert_close(mixed_bias.double().view(-1), (attention @ bias.double())[0], **tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("experts_count", [1, 2, 4, 5])
def test_mix_rows_mixes_every_element(experts_count, dtype):
    """mix_rows (the "chunked" strategy's mixing): out = attention @ experts for kernels of whole tiles (1024
    elements) and a tail, one and several rows, experts whose rows lie apart (a view of a wider tensor), against
    the float64 product."""
    torch.manual_seed(0)
    K = experts_count
    for rows, n in ((1, 1000), (5, 2 * 1024 + 37), (32, 3 * 1024)):
        attention = torch.softmax(torch.randn(rows, K, dtype=torch.float64), 1).to(dtype)
        experts = torch.randn(K, n + 11, dtype=dtype)[:, 5:n + 5]
        out = torch.full((rows, n), float("nan"), dtype=dtype)
        torch.ops.dyconv_cpu.mix_rows(attention, experts, out)
        torch.testing.assert_close(out.double(), attention.double() @ experts.double(), **TOL[dtype])


@needs_kernel
def test_mix_rows_checks_its_arguments():
    attention, experts, out = torch.rand(3, 4), torch.randn(4, 50), torch.empty(3, 50)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.dyconv_cpu.mix_rows(attention.double(), experts, out)
    with pytest.raises(RuntimeError, match="experts \\(K, N\\) with contiguous rows.*\\[4, 50\\].*\\(strides "
                                           "\\[1, 4\\]\\)"):
        torch.ops.dyconv_cpu.mix_rows(attention, torch.randn(50, 4).t(), out)
    with pytest.raises(RuntimeError, match="out \\(B, N\\) contiguous.*\\[3, 49\\]"):
        torch.ops.dyconv_cpu.mix_rows(attention, experts, torch.empty(3, 49))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.dyconv_cpu.mix_rows(attention.half(), experts.half(), out.half())


def profiled_op_names(fn):
    """Every operator ``fn()`` ran, nested or not, as PyTorch's profiler records them."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@needs_kernel
def test_chunked_mixes_with_the_kernel():
    """The "chunked" strategy mixes its chunks' kernels with mix_rows on the CPU, forward and backward, with the
    reference's values and gradients; under autocast and under a Python dispatch mode (``dyconv.profile``'s FLOP
    counter counts ``torch.mm``) with ``torch.mm``."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = DynamicConv2d(6, 8, 3, padding=1, num_experts=3, temperature=2.0, dtype=torch.float64)
    x = torch.randn(4, 6, 9, 10, dtype=torch.float64, requires_grad=True)
    names = profiled_op_names(lambda: assert_gradients_match_loop(layer, x, run(layer, x, "chunked")))
    assert "dyconv_cpu::mix_rows" in names
    torch.testing.assert_close(run(layer, x, "chunked"), per_sample_reference(layer, x), **TOL[torch.float64])
    with FlopCounterMode(display=False):
        names = profiled_op_names(lambda: run(layer, x, "chunked"))
    assert "dyconv_cpu::mix_rows" not in names and "aten::mm" in names
    layer, x = layer.float(), x.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        names = profiled_op_names(lambda: run(layer, x, "chunked"))
    assert "dyconv_cpu::mix_rows" not in names


@needs_kernel
def test_one_sample_mix_checks_its_arguments():
    x = torch.randn(1, 6, 5, 5)
    w1, b1, w2, b2 = torch.randn(4, 6), torch.randn(4), torch.randn(3, 4), torch.randn(3)
    experts, out = torch.randn(3, 54), torch.empty(54)
    torch.ops.dyconv_cpu.one_sample_mix(x, w1, b1, w2, b2, 1.0, experts, out, None)
    with pytest.raises(RuntimeError, match="shapes do not fit.*fc1 \\[4, 5\\]"):
        torch.ops.dyconv_cpu.one_sample_mix(x, torch.randn(4, 5), b1, w2, b2, 1.0, experts, out, None)
    with pytest.raises(RuntimeError, match="one CPU sample.*\\[2, 6, 5, 5\\]"):
        torch.ops.dyconv_cpu.one_sample_mix(torch.randn(2, 6, 5, 5), w1, b1, w2, b2, 1.0, experts, out, None)
    with pytest.raises(RuntimeError, match="contiguous CPU tensors of x's dtype"):
        torch.ops.dyconv_cpu.one_sample_mix(x, w1.double(), b1, w2, b2, 1.0, experts, out, None)
