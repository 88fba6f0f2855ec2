"""The compiled CPU kernel's ``"dense_kernel"`` strategy (``torch.ops.dyconv_cpu.dense_forward``: ungrouped stride-1
layers, the mixing inside the convolution's tiles) against the per-sample ``nn.ConvNd`` reference in float64 over a
grid of layers in 1-D, 2-D and 3-D, both memory formats of input and experts, with its gradients
(``torch.ops.dyconv_cpu.dense_backward``; recomputed by "chunked" where the padding exceeds the kernel's reach); each
of the forward's two loops called directly ("grid": vectors of positions on the padded grid, "channels": vectors of
output channels); in float32 on shapes that reach every tile and chunk boundary of each loop, forward and backward;
when the layers pick it; its errors."""

import pytest
import torch

from dyconv import DynamicConv2d, _cpu_kernel
from dyconv.functional import select_strategy
from reference import TOL, manual_attention, per_sample_reference
# _kernel_loaded: the autouse fixture that loads the kernel before each test, here too
from test_cpu_kernel import _kernel_loaded, assert_frozen_experts_gradients_match_loop, needs_kernel  # noqa: F401
from test_functional import LAYER, SPATIAL, assert_gradients_match_loop, largest_saved_tensor, run

CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=5, bias=False),
    dict(kernel_size=2, padding="same", padding_mode="reflect"),  # asymmetric: padded before the kernel
    dict(kernel_size=3, padding=1, padding_mode="circular"),
    dict(kernel_size=1),
    dict(kernel_size=3, padding=3),  # beyond the kernel's reach: backward recomputed by "chunked"
]
FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}
LOOPS = ["grid", "channels"]  # dense_forward's loops ("auto" picks one)


def layer_and_input(rank, case, batch, layout, in_channels=5, out_channels=7, dtype=torch.float64):
    """A layer (7 output channels: one full block of the kernel's six and a partial one) and its input; with
    ``layout="channels_last"`` (2-D and 3-D) both the input and the experts are channels_last."""
    layer = LAYER[rank](in_channels, out_channels, **case, num_experts=3, temperature=2.0, dtype=dtype)
    x = torch.randn(batch, in_channels, *SPATIAL[rank], dtype=dtype)
    if layout == "channels_last":  # the experts as (K * C_out, C_in, *kernel) in the format (3-D: by hand)
        w = layer.weight.detach()
        layer.weight.data = w.flatten(0, 1).contiguous(memory_format=FORMATS[rank]).view(w.shape)
        x = x.contiguous(memory_format=FORMATS[rank])
    return layer, x


@needs_kernel
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_reference(rank, case, batch, layout):
    if layout == "channels_last" and rank == 1:
        pytest.skip("no channels_last format in 1-D")
    layer, x = layer_and_input(rank, case, batch, layout)
    if layout == "channels_last" and layer.weight[0, 0, 0].numel() > 1:
        assert not layer.weight.is_contiguous()  # the experts' channels_last order is read as it is
    x.requires_grad_()
    out = run(layer, x, "dense_kernel")
    torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
    if layer.padding_mode == "zeros":  # the input's memory format (F.pad's output may have another)
        fmt = FORMATS[rank] if layout == "channels_last" else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt)
    assert_gradients_match_loop(layer, x, out)


def dense_forward(layer, x, loop, attention=None):
    """``dense_forward`` on the layer's experts and bias with the given loop, for the layer's attention on ``x``
    (computed by hand) or the given one."""
    attention = manual_attention(layer, x) if attention is None else attention
    return torch.ops.dyconv_cpu.dense_forward(x, layer.weight, attention, layer.bias, list(layer.padding),
                                              list(layer.dilation), loop)


@needs_kernel
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", [c for c in CASES if "padding_mode" not in c], ids=str)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("loop", LOOPS)
def test_each_loop_matches_reference(rank, case, batch, layout, loop):
    """Each loop of the forward at any batch size, whatever "auto" would pick, for an attention given directly."""
    if layout == "channels_last" and rank == 1:
        pytest.skip("no channels_last format in 1-D")
    layer, x = layer_and_input(rank, case, batch, layout)
    attention = torch.softmax(torch.randn(batch, 3, dtype=torch.float64), 1)
    with torch.no_grad():
        out = dense_forward(layer, x, loop, attention)
        torch.testing.assert_close(out, per_sample_reference(layer, x, attention), **TOL[torch.float64])
    fmt = FORMATS[rank] if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@needs_kernel
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("num_experts", [1, 2, 4, 5])
def test_expert_counts(rank, num_experts):
    """Four experts (the paper's K) are mixed in one pass, other counts one pass per expert: both exact."""
    layer = LAYER[rank](5, 7, 3, padding=1, num_experts=num_experts, temperature=2.0, dtype=torch.float64)
    x = torch.randn(3, 5, *SPATIAL[rank], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(run(layer, x, "dense_kernel"), per_sample_reference(layer, x),
                                   **TOL[torch.float64])


@needs_kernel
@pytest.mark.parametrize("size", [(13, 11), (7, 7), (5, 5), (4, 4), (3, 4), (3, 3), (2, 3), (1, 3), (2, 1), (1, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("loop", LOOPS)
def test_float32_every_tile_and_chunk(size, layout, loop):
    """float32 against the float64 reference where every boundary is reached: 100 x 9 kernel elements per output
    channel, 70 output channels, at batch 3 and at batch 1. "grid": more than one buffer of mixed weights (8 KB holds
    336 per channel for six channels, steps of 336, 336 and 228 in the experts' memory order; at batch 3 the steps' rows
    copied once for the batch), eleven full blocks of six output channels and a partial one, and positions (with the
    padded rows' extra columns) that end on each kind of vector tile (16 floats per vector with AVX-512: 167, 61, 33,
    22, 16, 8 and 1 positions are 11, 4, 3, 2, 1, 1 and 1 vectors). "channels": steps of 128 kernel rows (seven and one
    of 4; 32 KB of mixed rows for 64 channels), one full block of 64 output channels and a partial one of 6 (one
    vector), and tiles of every size from one to seven positions (a sample's positions in tiles of at most seven, as
    even as they go: 143, 49, 25, 16, 12, 9, 6, 3, 2 and 1 positions in tiles of 7 and 6, 7, 7 and 6, 6 and 5, 6, 5 and
    4, 6, 3, 2 and 1). The batch-1 route through the layer too."""
    layer = DynamicConv2d(100, 70, 3, padding=1, num_experts=4, temperature=3.0, dtype=torch.float64)
    x = torch.randn(3, 100, *size, dtype=torch.float64)
    expected = per_sample_reference(layer, x).float()
    layer, x = layer.float(), x.float()
    if layout == "channels_last":
        layer, x = layer.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for batch in (3, 1):
            torch.testing.assert_close(dense_forward(layer, x[:batch], loop), expected[:batch], **TOL[torch.float32])
        if size[0] * size[1] <= _cpu_kernel.DENSE_MAX_POSITIONS and loop == "grid":
            torch.testing.assert_close(layer(x[:1]), expected[:1], **TOL[torch.float32])  # the batch-1 route


@needs_kernel
@pytest.mark.parametrize("size", [(13, 11), (7, 7), (5, 5), (4, 4), (3, 4), (3, 3), (2, 3), (1, 3), (2, 1), (1, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_gradients_every_tile_and_chunk(size, layout):
    """Backward in float32 against the float64 reference's gradients where every boundary of its loops is reached:
    70 channels in and out (with AVX-512 one full block of 64 channels and a partial one of one vector, in both
    directions), 630 kernel rows per output channel (six full tasks of 96 and a partial one, groups of 12, tiles of
    6), and positions that make the input gradient's position tiles take every size from one to seven (as in
    test_float32_every_tile_and_chunk)."""
    layer = DynamicConv2d(70, 70, 3, padding=1, num_experts=4, temperature=3.0, dtype=torch.float64)
    x = torch.randn(3, 70, *size, dtype=torch.float64, requires_grad=True)
    expected_out = run(layer, x, "loop")
    grad_out = torch.randn_like(expected_out)
    expected = torch.autograd.grad(expected_out, [x, layer.weight, layer.bias], grad_out)
    layer32 = layer.float()
    x32 = x.detach().float()
    if layout == "channels_last":
        layer32, x32 = layer32.to(memory_format=torch.channels_last), x32.contiguous(memory_format=torch.channels_last)
    x32.requires_grad_()
    out = run(layer32, x32, "dense_kernel")
    got = torch.autograd.grad(out, [x32, layer32.weight, layer32.bias], grad_out.float())
    for g, e in zip(got, expected):
        scale = e.abs().max().item()
        torch.testing.assert_close(g.double() / scale, e / scale, rtol=0, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("channels", [84, 104, 124, 150])
@pytest.mark.parametrize("threads", [2, 3])
def test_float32_partial_blocks_and_sample_groups(channels, threads):
    """The channels loop and the weight gradient where a block's last vectors hold no channels, forward and backward
    in float32 against the float64 reference, at batch 5: with AVX-512 (blocks of four vectors of 16 floats) 84, 104,
    124 and 150 channels in and out end on a block of 2, 3, 4 and 2 vectors; 150 channels are three blocks, which the
    forward splits into groups of samples (2 and 3 samples) so that two threads get equal shares."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layer = DynamicConv2d(channels, channels, 3, padding=1, num_experts=4, temperature=3.0, dtype=torch.float64)
        x = torch.randn(5, channels, 4, 5, dtype=torch.float64, requires_grad=True)
        expected_out = run(layer, x, "loop")
        grad_out = torch.randn_like(expected_out)
        expected = torch.autograd.grad(expected_out, [x, layer.weight, layer.bias], grad_out)
        layer32, x32 = layer.float(), x.detach().float().requires_grad_()
        with torch.no_grad():
            torch.testing.assert_close(dense_forward(layer32, x32, "channels"), expected_out.float(),
                                       **TOL[torch.float32])
        out = run(layer32, x32, "dense_kernel")
        torch.testing.assert_close(out, expected_out.float(), **TOL[torch.float32])
        got = torch.autograd.grad(out, [x32, layer32.weight, layer32.bias], grad_out.float())
        for g, e in zip(got, expected):
            scale = e.abs().max().item()
            torch.testing.assert_close(g.double() / scale, e / scale, rtol=0, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


@needs_kernel
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_layers_pick_it(rank):
    layer, _ = layer_and_input(rank, CASES[0], 4, "contiguous")
    # 40, 90 or 80 output positions: above the tiny outputs' rules
    x = torch.randn(4, 5, *{1: (40,), 2: (9, 10), 3: (4, 5, 4)}[rank], dtype=torch.float64)
    args = ([1] * rank, 1, layer.stride, layer.dilation)
    # with gradients: at batch > 1, where the padding is within the kernel's reach
    assert select_strategy(x, layer.weight, *args) == "dense_kernel"
    assert select_strategy(x[:1], layer.weight, *args) == "chunked"
    wide_padding = ([3] + [1] * (rank - 1), 1, layer.stride, layer.dilation)  # 44, 80 or 100 output positions
    padded = torch.randn(4, 5, *{1: (40,), 2: (4, 10), 3: (1, 5, 4)}[rank], dtype=torch.float64, requires_grad=True)
    assert select_strategy(padded, layer.weight, *wide_padding) == "chunked"
    with torch.no_grad():
        assert select_strategy(padded, layer.weight, *wide_padding) == "dense_kernel"
    with torch.no_grad():
        assert select_strategy(x, layer.weight, *args) == "dense_kernel"
        assert select_strategy(x.float(), layer.weight.float(), *args) == "dense_kernel"
        # not for 1x1 kernels at this batch size (test_layers_pick_it_for_small_1x1_outputs), strided or grouped
        # layers, one expert, larger outputs, float16, autocast, meta
        one = torch.zeros(3, 7, 5, *[1] * rank, dtype=torch.float64)
        assert select_strategy(x, one, [0] * rank, 1, layer.stride, layer.dilation) != "dense_kernel"
        assert select_strategy(x, layer.weight, [1] * rank, 1, [2] * rank, layer.dilation) != "dense_kernel"
        grouped = torch.zeros(3, 8, 1, *layer.kernel_size, dtype=torch.float64)
        assert select_strategy(x, grouped, [1] * rank, 5, layer.stride, layer.dilation) != "dense_kernel"
        assert select_strategy(x, layer.weight[:1], *args) != "dense_kernel"
        large = torch.zeros(4, 5, *{1: (200,), 2: (15, 15), 3: (6, 6, 6)}[rank], dtype=torch.float64)  # > 196
        assert select_strategy(large, layer.weight, *args) != "dense_kernel"
        assert select_strategy(x.half(), layer.weight.half(), *args) != "dense_kernel"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert select_strategy(x, layer.weight, *args) != "dense_kernel"
        assert select_strategy(x.to("meta"), layer.weight.to("meta"), *args) != "dense_kernel"
        # up to DENSE_MAX_POSITIONS at any batch size, however few channels
        last = torch.zeros(4, 5, *{1: (196,), 2: (14, 14), 3: (4, 7, 7)}[rank], dtype=torch.float64)
        assert select_strategy(last, layer.weight, *args) == "dense_kernel"
        assert select_strategy(last[:1], layer.weight, *args) == "dense_kernel"
        # and through the layer: the reference's values
        torch.testing.assert_close(layer.eval()(x), per_sample_reference(layer, x), **TOL[torch.float64])


@needs_kernel
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("grad", [False, True])
def test_layers_pick_it_for_small_1x1_outputs(rank, grad):
    """1x1 kernels: from batch DENSE_1X1_MIN_BATCH on, at most DENSE_1X1_MAX_POSITIONS output positions, with or
    without gradients (MobileNetV2's 1x1 layers at 7x7 and 4x4 outputs in training); the reference's values there."""
    assert 4 <= _cpu_kernel.DENSE_1X1_MIN_BATCH <= 32 and 16 <= _cpu_kernel.DENSE_1X1_MAX_POSITIONS < 196
    batch, most = _cpu_kernel.DENSE_1X1_MIN_BATCH, _cpu_kernel.DENSE_1X1_MAX_POSITIONS
    layer = LAYER[rank](6, 10, 1, num_experts=4, dtype=torch.float64)
    sizes = {1: [(most,), (most + 1,)], 2: [(1, most), (most + 1, 1)], 3: [(1, 1, most), (1, most + 1, 1)]}[rank]
    args = ([0] * rank, 1, layer.stride, layer.dilation)
    with torch.set_grad_enabled(grad):
        fits, larger = (torch.randn(batch, 6, *size, dtype=torch.float64, requires_grad=grad) for size in sizes)
        assert select_strategy(fits, layer.weight, *args) == "dense_kernel"
        assert select_strategy(fits[:batch - 1], layer.weight, *args) != "dense_kernel"
        assert select_strategy(larger, layer.weight, *args) != "dense_kernel"
        tiny = fits[..., :4]  # 4 positions: ahead of the tiny outputs' rules
        assert select_strategy(tiny, layer.weight, *args) == "dense_kernel"
        assert select_strategy(fits[..., :3], layer.weight, *args) != "dense_kernel"
        out = layer(fits)
        torch.testing.assert_close(out, per_sample_reference(layer, fits), **TOL[torch.float64])
    if grad:
        assert_gradients_match_loop(layer, fits, out)


@needs_kernel
def test_does_not_keep_per_sample_kernels_for_backward():
    """Backward keeps the input, the experts and the attention only (bounded training memory, as "chunked")."""
    batch = 16
    layer = DynamicConv2d(32, 32, 3, padding=1, num_experts=4)
    x = torch.randn(batch, 32, 4, 4, requires_grad=True)
    assert largest_saved_tensor(layer, x, "groups") >= batch * layer.weight[0].numel()  # the measurement sees them
    assert largest_saved_tensor(layer, x, "dense_kernel") <= max(x.numel(), layer.weight.numel())


@needs_kernel
def test_gradients_for_a_subset_of_inputs():
    """Backward asked only for some inputs (frozen experts, an input without gradient) gives those, equal to the
    reference's."""
    layer, x = layer_and_input(2, CASES[0], 3, "contiguous")
    assert_frozen_experts_gradients_match_loop(layer, x, "dense_kernel")


@needs_kernel
def test_not_under_a_python_dispatch_mode():
    """Under a Python dispatch mode (FlopCounterMode, which dyconv.profile uses) the layers keep to PyTorch
    operators, whose FLOPs the mode sees, at any batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    layer, x = layer_and_input(2, CASES[0], 4, "contiguous")
    layer.eval()
    for batch in (1, 4):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            assert select_strategy(x, layer.weight, [1, 1], 1, layer.stride, layer.dilation) == "chunked"
            layer(x[:batch])
        # at least the convolution's 2 x 5 x 9 FLOPs per output element
        assert counter.get_total_flops() >= 2 * 5 * 9 * batch * 7 * x[0, 0].numel()


def test_errors_name_the_bad_value():
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(ValueError, match="ungrouped stride-1 layer: got groups=2, stride=\\[1, 1\\]"):
        run(DynamicConv2d(4, 8, 3, groups=2, num_experts=3), x, "dense_kernel")
    with pytest.raises(ValueError, match="ungrouped stride-1 layer: got groups=1, stride=\\[2, 2\\]"):
        run(DynamicConv2d(4, 8, 3, stride=2, num_experts=3), x, "dense_kernel")
    with pytest.raises(ValueError, match="float32 or float64.*dtype=torch.float16"):
        run(DynamicConv2d(4, 8, 3, num_experts=3).half(), x.half(), "dense_kernel")


@needs_kernel
def test_dense_forward_checks_its_arguments():
    x, experts, attention = torch.randn(2, 4, 6, 6), torch.randn(3, 5, 4, 3, 3), torch.rand(2, 3)
    assert torch.ops.dyconv_cpu.dense_forward(x, experts, attention, None, [1, 1], [1, 1]).shape == (2, 5, 6, 6)
    with pytest.raises(RuntimeError, match="attention must be \\(2, 3\\), got \\[2, 4\\]"):
        torch.ops.dyconv_cpu.dense_forward(x, experts, torch.rand(2, 4), None, [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="C_in = 4, got \\[3, 5, 2, 3, 3\\]"):
        torch.ops.dyconv_cpu.dense_forward(x, experts[:, :, :2], attention, None, [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="bias must be \\(3, 5\\), got \\[3, 4\\]"):
        torch.ops.dyconv_cpu.dense_forward(x, experts, attention, torch.randn(3, 4), [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="output would be empty \\(input 6, kernel 3, padding 0, dilation 4\\)"):
        torch.ops.dyconv_cpu.dense_forward(x, experts, attention, None, [0, 0], [4, 4])
    with pytest.raises(RuntimeError, match="float32 or float64 CPU tensor, got Half"):
        torch.ops.dyconv_cpu.dense_forward(x.half(), experts, attention, None, [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="loop must be 'auto', 'grid' or 'channels', got 'rows'"):
        torch.ops.dyconv_cpu.dense_forward(x, experts, attention, None, [1, 1], [1, 1], "rows")


@needs_kernel
def test_dense_backward_checks_its_arguments():
    x, experts, attention = torch.randn(2, 4, 6, 6), torch.randn(3, 5, 4, 3, 3), torch.rand(2, 3)
    grad_y = torch.randn(2, 5, 6, 6)
    gx, ge, ga = torch.ops.dyconv_cpu.dense_backward(grad_y, x, experts, attention, [1, 1], [1, 1], True, True)
    assert (gx.shape, ge.shape, ga.shape) == (x.shape, experts.shape, attention.shape)
    with pytest.raises(RuntimeError, match="grad_y must be \\[2, 5, 6, 6\\], got \\[2, 5, 4, 4\\]"):
        torch.ops.dyconv_cpu.dense_backward(grad_y[:, :, :4, :4], x, experts, attention, [1, 1], [1, 1], True, True)
    with pytest.raises(RuntimeError, match="padding <= dilation \\* \\(kernel - 1\\), got padding \\[3, 3\\]"):
        torch.ops.dyconv_cpu.dense_backward(torch.randn(2, 5, 10, 10), x, experts, attention, [3, 3], [1, 1], True,
                                            False)
    with pytest.raises(RuntimeError, match="attention must be \\(2, 3\\), got \\[2, 4\\]"):
        torch.ops.dyconv_cpu.dense_backward(grad_y, x, experts, torch.rand(2, 4), [1, 1], [1, 1], True, True)
