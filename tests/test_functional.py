"""Every per-sample convolution strategy, called directly, against the nn.ConvNd reference."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dyconv import DynamicConv1d, DynamicConv2d, DynamicConv3d
from dyconv import _chunked, _cpu_kernel
from dyconv.functional import BATCH_GENERIC_STRATEGIES, STRATEGIES, apply_padding, dynamic_conv, select_strategy
from reference import CONV, TOL, manual_attention, per_sample_reference

LAYER = {1: DynamicConv1d, 2: DynamicConv2d, 3: DynamicConv3d}
SPATIAL = {1: (13,), 2: (9, 10), 3: (5, 6, 7)}
CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, dilation=2, padding=2),
    dict(kernel_size=3, groups=2, padding=1),
    dict(kernel_size=3, groups=4, padding="same", padding_mode="reflect"),  # depthwise
    dict(kernel_size=2, padding="same"),
    dict(kernel_size=1),
    dict(kernel_size=1, stride=2, groups=2),
]


def run(layer, x, strategy):
    attention = layer.attention(x)
    return dynamic_conv(x, layer.weight, layer.bias, attention, layer.stride, layer._padding_pairs, layer.dilation,
                        layer.groups, layer.padding_mode, strategy)


def assert_gradients_match_loop(layer, x, out):
    """Gradients of ``out`` (from ``layer`` on ``x``) w.r.t. input, experts, bias and router equal the
    ``"loop"`` strategy's (plain autograd through per-sample dense convolutions)."""
    params = [p for p in (x, layer.weight, layer.bias, *layer.router.parameters()) if p is not None]
    grads = torch.autograd.grad(out.sin().sum(), params)
    ref_grads = torch.autograd.grad(run(layer, x, "loop").sin().sum(), params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


def applicable(strategy, layer):
    if strategy == "depthwise_kernel":  # tested on its own grid (test_cpu_kernel.py)
        return layer.groups == layer.in_channels == layer.out_channels
    if strategy == "dense_kernel":  # ungrouped stride-1 layers
        return layer.groups == 1 and all(s == 1 for s in layer.stride)
    one_by_one = all(k == 1 for k in layer.kernel_size) and not any(layer._padding_pairs)
    return strategy != "matmul" or one_by_one


def strategy_case(strategy, rank, case, batch):
    """``(layer, x)`` in float64 for one cell of the strategy grid (skips where ``strategy`` does not apply)."""
    layer = LAYER[rank](4, 8, **case, num_experts=3, temperature=2.0, dtype=torch.float64)
    if not applicable(strategy, layer):
        pytest.skip(f"{strategy} does not apply to this layer")
    return layer, torch.randn(batch, 4, *SPATIAL[rank], dtype=torch.float64)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_strategy_matches_reference(strategy, rank, case, batch):
    layer, x = strategy_case(strategy, rank, case, batch)
    torch.testing.assert_close(run(layer, x, strategy), per_sample_reference(layer, x), **TOL[torch.float64])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_empty_batch_like_nn_conv(strategy, rank, case):
    """A batch of zero samples, which nn.ConvNd accepts (every strategy once failed on it): the output has
    nn.ConvNd's shape, and backward gives zero gradients to the experts, the biases and the router."""
    layer, x = strategy_case(strategy, rank, case, 0)
    x.requires_grad_()
    static = CONV[rank](4, 8, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups,
                        padding_mode=layer.padding_mode, dtype=torch.float64)
    out = run(layer, x, strategy)
    assert out.shape == static(x).shape
    params = [x, layer.weight, layer.bias, *layer.router.parameters()]
    grads = torch.autograd.grad(out.sum(), params)
    assert grads[0].shape == x.shape
    for g, p in zip(grads[1:], params[1:]):
        assert g.shape == p.shape and not g.any()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_gradients_agree(strategy):
    out_channels, groups = (4, 4) if strategy == "depthwise_kernel" else (8, 1)
    layer = DynamicConv2d(4, out_channels, 1 if strategy == "matmul" else 3, groups=groups, num_experts=3,
                          dtype=torch.float64)
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    ref_grads = torch.autograd.grad(run(layer, x, "loop").square().sum(), [x, layer.weight, layer.bias])
    grads = torch.autograd.grad(run(layer, x, strategy).square().sum(), [x, layer.weight, layer.bias])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


class _RecordOps(TorchDispatchMode):
    """Records every aten op that writes a new tensor or copies into one, with the numel it writes (views excluded:
    they write nothing)."""

    def __init__(self):
        super().__init__()
        self.written = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        is_view = len(returns) == 1 and returns[0].alias_info is not None and not func._schema.is_mutable
        if not is_view:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.written.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("strategy", ["unfold_experts", "experts"])
def test_expert_gradient_written_once(strategy):
    """The K-kernel strategies' backward (plain autograd through views of the experts) writes the experts'
    gradient once, in their own layout: no copy of K kernels' worth of gradient ("unfold_experts" once multiplied
    by the experts' transposed view, which wrote the gradient transposed, and autograd copied it back)."""
    layer = DynamicConv2d(8, 16, 3, padding=1, bias=False, num_experts=3)
    x = torch.randn(4, 8, 3, 3)
    loss = run(layer, x, strategy).square().sum()
    recorder = _RecordOps()
    with recorder:
        loss.backward()
    writes = [name for name, numel in recorder.written if numel == layer.weight.numel()]
    assert len(writes) == 1, writes
    assert layer.weight.grad.is_contiguous()


@pytest.mark.parametrize("strategy", ["unfold_experts", "experts"])
@pytest.mark.parametrize("rank", [2, 3])
def test_channels_last_experts_are_not_copied(strategy, rank):
    """With channels_last experts (``model.to(memory_format=torch.channels_last)``; in 3-D set by hand) the K-kernel
    strategies use them as views: no copy of K kernels in the forward (it would be kept for backward), their
    gradient written once, in the parameter's own layout; values and gradients against the reference and "loop"."""
    fmt = torch.channels_last if rank == 2 else torch.channels_last_3d
    layer = LAYER[rank](8, 16, 3, padding=1, num_experts=3, temperature=2.0, dtype=torch.float64)
    if rank == 2:
        layer = layer.to(memory_format=fmt)  # converts the 5-D experts as (K * C_out, C_in, kh, kw)
    else:  # Module.to leaves 6-D tensors alone: (K, C_out, *kernel, C_in) memory by hand
        taps_last = [0, 1, 3, 4, 5, 2]
        with torch.no_grad():
            layer.weight.set_(layer.weight.permute(taps_last).contiguous().permute([0, 1, 5, 2, 3, 4]))
    assert layer.weight.permute([0, 1] + list(range(3, rank + 3)) + [2]).is_contiguous()
    x = torch.randn(4, 8, *[3] * rank, dtype=torch.float64)
    expected = per_sample_reference(layer, x)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    recorder = _RecordOps()
    with recorder:
        out = run(layer, x, strategy)
    assert [name for name, numel in recorder.written if numel == layer.weight.numel()] == []
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    recorder = _RecordOps()
    with recorder:
        out.square().sum().backward()
    writes = [name for name, numel in recorder.written if numel == layer.weight.numel()]
    if rank == 2 or strategy == "unfold_experts":
        # (3-D "experts": the CPU's float64 conv3d writes its weight gradient contiguous, then autograd copies it)
        assert len(writes) == 1, writes
    assert layer.weight.grad.stride() == layer.weight.stride()
    layer.zero_grad()
    assert_gradients_match_loop(layer, x, run(layer, x, strategy))


def test_attention_need_not_be_a_softmax():
    layer = DynamicConv2d(4, 6, 3, num_experts=2, dtype=torch.float64)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    attention = torch.tensor([[2.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
    for strategy in ["groups", "loop", "unfold", "experts"]:
        torch.testing.assert_close(run_with(layer, x, attention, strategy),
                                   per_sample_reference(layer, x, attention), **TOL[torch.float64])


def run_with(layer, x, attention, strategy):
    return dynamic_conv(x, layer.weight, layer.bias, attention, layer.stride, layer._padding_pairs, layer.dilation,
                        layer.groups, layer.padding_mode, strategy)


def test_auto_picks_chunked_in_eager_mode():
    w3, w1 = torch.zeros(4, 8, 8, 3, 3), torch.zeros(4, 8, 8, 1, 1)
    assert select_strategy(torch.zeros(1, 8, 5, 5), w3, [1, 1], 1) == "chunked"
    assert select_strategy(torch.zeros(4, 8, 5, 5), w3, [1, 1], 1) == "chunked"
    assert select_strategy(torch.zeros(4, 8, 5, 5), w1, [0, 0], 1) == "chunked"


def test_auto_picks_experts_for_tiny_ungrouped_outputs():
    w = torch.zeros(4, 8, 8, 3, 3)
    one = [1, 1]
    # the rules for tiny outputs as they stand without the compiled kernel (meta tensors); where it applies it comes
    # first from DENSE_OVER_TINY_MIN_POSITIONS (4) output positions
    dense = _cpu_kernel.available()

    def without_kernel(x, w):
        return select_strategy(x.to("meta"), w.to("meta"), [1, 1], 1, one, one)

    # 2x2 output: 4 positions <= UNFOLD_EXPERTS_MAX_POSITIONS
    assert without_kernel(torch.zeros(4, 8, 2, 2), w) == "unfold_experts"
    assert select_strategy(torch.zeros(4, 8, 2, 2), w, [1, 1], 1, one, one) == (
        "dense_kernel" if dense else "unfold_experts")
    # 1x1 output: below DENSE_OVER_TINY_MIN_POSITIONS, the rules for tiny outputs with the compiled kernel too
    assert select_strategy(torch.zeros(4, 8, 1, 1), w, [1, 1], 1, one, one) == "unfold_experts"
    # 3x3 output: 9 x (K - 1) = 27 <= 48
    assert without_kernel(torch.zeros(4, 8, 3, 3), w) == "experts"
    assert select_strategy(torch.zeros(4, 8, 3, 3), w, [1, 1], 1, one, one) == ("dense_kernel" if dense else "experts")
    # ... unless the input is wide
    wide = torch.zeros(4, 8, 256, 3, 3)
    assert without_kernel(torch.zeros(4, 256, 3, 3), wide) == "unfold_experts"
    # 1x1 kernels: their K-kernel convolution is one matrix product already
    w1 = torch.zeros(4, 8, 256, 1, 1)
    assert select_strategy(torch.zeros(4, 256, 2, 2), w1, [0, 0], 1, one, one) == "experts"
    # ... and where they expand the channels, K scaled copies of the (smaller) input instead of K outputs
    expand = torch.zeros(4, 64, 16, 1, 1)
    assert select_strategy(torch.zeros(4, 16, 4, 4), expand, [0, 0], 1, one, one) == "scaled_inputs"
    assert select_strategy(torch.zeros(4, 16, 8, 8), expand, [0, 0], 1, [2, 2], one) == "experts"  # strided
    assert select_strategy(torch.zeros(4, 16, 2, 2), expand, [1, 1], 1, one, one) == "experts"  # padded
    assert select_strategy(torch.zeros(4, 16, 5, 5), expand, [0, 0], 1, one, one) == "chunked"  # 25 positions
    # 5x5 output: 75 > 48 (without gradients, ungrouped stride-1 layers take the compiled kernel where it is built)
    larger = "dense_kernel" if _cpu_kernel.available() else "chunked"
    assert select_strategy(torch.zeros(4, 8, 5, 5), w, [1, 1], 1, one, one) == larger
    # ... with gradients too (the compiled backward), but not where the padding exceeds the kernel's reach
    assert select_strategy(torch.zeros(4, 8, 5, 5, requires_grad=True), w, [1, 1], 1, one, one) == larger
    assert select_strategy(torch.zeros(4, 8, 3, 3, requires_grad=True), w, [3, 3], 1, one, one) == "chunked"
    # 4x4 output: 16 positions, where the compiled kernel applies it comes first (with gradients too); on meta
    # tensors (no compiled kernel) the tiny outputs' rule
    assert select_strategy(torch.zeros(4, 8, 4, 4), w, [1, 1], 1, one, one) == (
        "dense_kernel" if _cpu_kernel.available() else "experts")
    assert select_strategy(torch.zeros(4, 8, 4, 4, requires_grad=True), w, [1, 1], 1, one, one) == (
        "dense_kernel" if _cpu_kernel.available() else "experts")
    assert select_strategy(torch.zeros(4, 8, 4, 4, device="meta"), w.to("meta"), [1, 1], 1, one, one) == "experts"
    # stride 2 brings 4x4 down to 2x2
    assert select_strategy(torch.zeros(4, 8, 4, 4), w, [1, 1], 1, [2, 2], one) == "unfold_experts"
    # grouped, batch 1 and K = 1 stay chunked (aggregate-then-convolve reads each kernel once), except where the
    # compiled kernel takes batch 1 without gradients
    wg = torch.zeros(4, 8, 4, 3, 3)
    assert select_strategy(torch.zeros(4, 8, 1, 1), wg, [1, 1], 2, one, one) == "chunked"
    assert select_strategy(torch.zeros(1, 8, 1, 1), w, [1, 1], 1, one, one) == larger  # batch 1: the compiled kernel
    assert select_strategy(torch.zeros(1, 8, 1, 1, requires_grad=True), w, [1, 1], 1, one, one) == "chunked"
    assert select_strategy(torch.zeros(4, 8, 1, 1), w[:1], [1, 1], 1, one, one) == "chunked"


@pytest.fixture
def meta_as_accelerator(monkeypatch):
    """meta tensors follow the non-CPU rules (meta stands in for CUDA here; normally it follows the CPU's)."""
    monkeypatch.setattr(_chunked, "CPU_RULES", ("cpu",))


def test_auto_on_other_devices_picks_experts_up_to_14x14_outputs(meta_as_accelerator):
    """On other devices than the CPU ungrouped layers at batch > 1 with at most ACCELERATOR_EXPERTS_MAX_POSITIONS
    (196) output positions use "experts", never "unfold_experts"."""
    one = [1, 1]

    def pick(x, w, padding=one, groups=1, stride=one):
        return select_strategy(x.to("meta"), w.to("meta"), padding, groups, stride, one)

    w = torch.zeros(4, 8, 8, 3, 3)
    assert pick(torch.zeros(4, 8, 14, 14), w) == "experts"
    assert pick(torch.zeros(4, 8, 15, 14), w) == "chunked"  # 210 positions
    assert pick(torch.zeros(4, 8, 28, 28), w, stride=[2, 2]) == "experts"  # 14x14 output
    assert pick(torch.zeros(4, 8, 2, 2), w) == "experts"  # the CPU: "unfold_experts"
    assert pick(torch.zeros(4, 8, 7, 7), torch.zeros(4, 8, 8, 1, 1), [0, 0]) == "experts"
    assert pick(torch.zeros(4, 8, 4, 4), torch.zeros(4, 32, 8, 1, 1), [0, 0]) == "experts"  # the CPU: "scaled_inputs"
    assert pick(torch.zeros(4, 8, 7, 7), torch.zeros(4, 8, 4, 3, 3), groups=2) == "chunked"
    assert pick(torch.zeros(1, 8, 7, 7), w) == "chunked"
    assert select_strategy(torch.zeros(4, 8, 14, 14), w, one, 1, one, one) in ("dense_kernel", "chunked")  # the CPU


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_output_positions_match_the_convolution(rank, case):
    from dyconv.functional import output_positions

    layer = LAYER[rank](4, 8, **case, num_experts=2)
    x = torch.randn(2, 4, *SPATIAL[rank])
    x_pad, conv_padding = apply_padding(x, layer._padding_pairs, layer.padding_mode)
    out = run(layer, x, "loop")
    assert output_positions(x_pad, layer.weight, layer.stride, conv_padding, layer.dilation) == out[0, 0].numel()


def test_layer_on_tiny_outputs_uses_experts_and_matches_reference():
    for size, expected in ((3, "unfold_experts"), (5, "experts")):
        layer = DynamicConv2d(8, 16, 3, padding=1, stride=2, num_experts=4, dtype=torch.float64)
        x = torch.randn(3, 8, size, size, dtype=torch.float64, requires_grad=True)
        assert select_strategy(x, layer.weight, [1, 1], 1, layer.stride, layer.dilation) == expected
        out = layer(x)
        torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
        assert_gradients_match_loop(layer, x, out)
    layer = DynamicConv2d(8, 32, 1, num_experts=4, dtype=torch.float64)  # a 1x1 expansion
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 8, 4, 4, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
        assert select_strategy(x, layer.weight, [0, 0], 1, layer.stride, layer.dilation) == "scaled_inputs"
        out = layer(x)
        torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
        assert out.is_contiguous(memory_format=fmt)
        assert_gradients_match_loop(layer, x, out)


def test_padding_is_left_to_the_conv_when_it_can():
    x = torch.randn(1, 2, 5, 5)
    same, conv_pad = apply_padding(x, [1, 1, 2, 2], "zeros")
    assert same is x and conv_pad == [1, 2]
    padded, conv_pad = apply_padding(x, [0, 1, 1, 1], "zeros")
    assert padded.shape == (1, 2, 6, 7) and conv_pad == [0, 0]


def test_errors():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(3, 4, 4, 3, 3)
    a = torch.softmax(torch.randn(2, 3), 1)
    with pytest.raises(ValueError, match="strategy='bogus'"):
        dynamic_conv(x, w, None, a, [1, 1], [0, 0, 0, 0], [1, 1], 1, "zeros", "bogus")
    with pytest.raises(ValueError, match="1x1 kernels"):
        dynamic_conv(x, w, None, a, [1, 1], [0, 0, 0, 0], [1, 1], 1, "zeros", "matmul")


# --- the "chunked" strategy: several chunks, channels_last, bounded saved memory, scripting -------------------

@pytest.fixture
def tiny_chunks(monkeypatch):
    """Budgets so small that a batch of 5 splits into chunks of 2 samples (forward) and 3 (backward)."""
    monkeypatch.setattr(_chunked, "FORWARD_CHUNK_ELEMENTS", 2)
    monkeypatch.setattr(_chunked, "BACKWARD_CHUNK_ELEMENTS", 3)
    monkeypatch.setattr(_chunked, "chunk_size", lambda batch, kernel_numel, budget: min(batch, budget))


@pytest.fixture(params=["batch-as-groups", "per-sample"])
def per_sample(request, monkeypatch):
    """Both ways of convolving a chunk: folded into the groups, or one convolution per sample."""
    on = request.param == "per-sample"
    monkeypatch.setattr(_chunked, "PER_SAMPLE_MIN_POSITIONS", 1 if on else 10**9)
    monkeypatch.setattr(_chunked, "PER_SAMPLE_GROUPED_MIN_ELEMENTS", 1)
    calls = []
    real = _chunked.convolves_per_sample
    monkeypatch.setattr(_chunked, "convolves_per_sample", lambda *args: calls.append(real(*args)) or calls[-1])
    return on, calls


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_chunks_mixed_by_scaled_adds(tiny_chunks, monkeypatch, rank, case):
    """Chunks of several samples whose kernels reach SCALED_ADDS_CHUNK_MIN_ELEMENTS (lowered here to every size)
    are mixed sample by sample by scaled adds, forward and backward: output and every gradient against the
    reference and the "loop" strategy, and the path taken for every sample of every chunk."""
    monkeypatch.setattr(_chunked, "SCALED_ADDS_CHUNK_MIN_ELEMENTS", 1)
    monkeypatch.setattr(_chunked, "SCALED_ADDS_MIN_ELEMENTS", 10**9)  # one-sample chunks: torch.mm
    rows = []
    real = _chunked.scaled_adds
    monkeypatch.setattr(_chunked, "scaled_adds", lambda w, *args: rows.append(len(w)) or real(w, *args))
    layer, x = strategy_case("chunked", rank, case, 5)
    x.requires_grad_()
    out = run(layer, x, "chunked")
    torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
    assert rows == [3] * 4  # forward chunks of 2, 2 (the last, of one sample, by torch.mm); K = 3 weights each
    assert_gradients_match_loop(layer, x, out)
    assert rows == [3] * 9  # and backward chunks of 3 and 2 samples (the "loop" reference mixes by torch.mm)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_chunked_over_several_chunks_matches_reference(tiny_chunks, per_sample, rank, case):
    layer = LAYER[rank](4, 8, **case, num_experts=3, temperature=2.0, dtype=torch.float64)
    x = torch.randn(5, 4, *SPATIAL[rank], dtype=torch.float64, requires_grad=True)
    out = run(layer, x, "chunked")
    torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
    assert_gradients_match_loop(layer, x, out)
    on, calls = per_sample
    matmul = _chunked.uses_matmul(layer.weight, layer.stride, [0] * rank, layer.dilation, layer.groups)
    matmul = matmul and not any(layer._padding_pairs)
    assert calls == [on and not matmul] * 2  # forward and backward


def test_per_sample_convolutions_for_large_outputs_only():
    w3, w1, wd = torch.zeros(4, 8, 8, 3, 3), torch.zeros(4, 8, 8, 1, 1), torch.zeros(4, 8, 1, 3, 3)
    one, pad = [1, 1], [1, 1]
    x = torch.zeros(2, 8, 23, 23)  # 529 output positions >= 512

    def per_sample(x, w, stride=one, padding=pad, groups=1, matmul=False, training=False, elements=1 << 18):
        return _chunked.convolves_per_sample(x, w, stride, padding, one, groups, matmul, 512, elements, training)

    assert per_sample(x, w3)
    assert not per_sample(x, w3, stride=[2, 2])  # 144 positions
    assert not per_sample(x[:1], w3)  # one sample: dense anyway
    assert not per_sample(x, w1, padding=[0, 0], matmul=True)  # 1x1: one bmm
    # grouped: always when training, without gradients only for large inputs (8 x 529 elements here)
    assert per_sample(x, wd, groups=8, training=True)
    assert not per_sample(x, wd, groups=8)
    assert per_sample(x, wd, groups=8, elements=8 * 529)
    strided = torch.zeros(2, 8, 46, 46)  # stride 2: 529 output positions; the input's elements count
    assert per_sample(strided, wd, stride=[2, 2], groups=8, elements=8 * 46 * 46)
    assert not per_sample(strided, wd, stride=[2, 2], groups=8, elements=8 * 46 * 46 + 1)


@pytest.fixture
def tiled(monkeypatch):
    """One-sample chunks and an expert-tile budget so small that the output channels split into tiles."""
    # one-sample chunks; within a tile, groups of two samples (mixed by one product, one convolution each)
    chunks = (_chunked.FORWARD_CHUNK_ELEMENTS, _chunked.BACKWARD_CHUNK_ELEMENTS)
    monkeypatch.setattr(_chunked, "chunk_size",
                        lambda batch, kernel_numel, budget: 1 if budget in chunks else min(batch, 2))
    monkeypatch.setattr(_chunked, "EXPERT_TILE_ELEMENTS", 50)
    calls = []
    real = _chunked._tiled_forward
    monkeypatch.setattr(_chunked, "_tiled_forward", lambda *args: calls.append(args[7]) or real(*args))
    return calls


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("grad", [False, True])
def test_chunked_output_tiles_match_reference(tiled, rank, case, grad):
    layer = LAYER[rank](4, 8, **case, num_experts=3, temperature=2.0, dtype=torch.float64)
    x = torch.randn(5, 4, *SPATIAL[rank], dtype=torch.float64, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = run(layer, x, "chunked")
    torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
    # 3 experts x 8 x 4 x taps >= 96 > 50 elements: ungrouped layers must have been tiled, grouped ones not
    assert (len(tiled) > 0) == (layer.groups == 1)
    assert all(t > 1 for t in tiled)
    if grad:
        assert_gradients_match_loop(layer, x, out)


def test_output_tiles_only_for_large_ungrouped_kernels_and_several_samples():
    w = torch.zeros(4, 512, 512, 3, 3)
    order = [1, 2, 3, 4]
    assert _chunked.output_tiles(w, 1, 32, 1, order, 1 << 21) == 5  # 9.4M expert elements / 2M per tile
    assert _chunked.output_tiles(w, 1, 1, 1, order, 1 << 21) == 1  # batch 1: each expert is read once anyway
    assert _chunked.output_tiles(w, 1, 32, 2, order, 1 << 21) == 1  # multi-sample chunks share the reads
    assert _chunked.output_tiles(w, 2, 32, 1, order, 1 << 21) == 1  # grouped
    assert _chunked.output_tiles(torch.zeros(4, 64, 64, 3, 3), 1, 32, 1, order, 1 << 21) == 1  # fits


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_workspace_reuse_keeps_results_independent(kernel_size):
    """Inference mixes into a reused buffer: outputs of earlier calls must not change, later calls must be right."""
    layer = DynamicConv2d(6, 8, kernel_size, padding=kernel_size // 2, num_experts=3).eval()
    xs = [torch.randn(b, 6, 7, 7) for b in (1, 4, 2)]
    with torch.no_grad():
        outs = [layer(x) for x in xs]
        kept = [o.clone() for o in outs]
        again = [layer(x) for x in xs]
    for x, o, k, a in zip(xs, outs, kept, again):
        torch.testing.assert_close(o, k, rtol=0, atol=0)
        torch.testing.assert_close(a, o, rtol=0, atol=0)
        torch.testing.assert_close(o.double(), per_sample_reference(layer.double(), x.double()), rtol=1e-4,
                                   atol=1e-4)
        layer.float()
    buf = _chunked.workspace(1, torch.zeros(1))
    assert all(o.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr() for o in outs)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_workspace_from_inference_mode_serves_training(kernel_size, monkeypatch):
    monkeypatch.setattr(_cpu_kernel, "DENSE_MAX_POSITIONS", -1)  # the chunked strategy's workspace, all calls
    _chunked.clear_workspaces()
    layer = DynamicConv2d(6, 8, kernel_size, padding=kernel_size // 2, num_experts=3)
    x = torch.randn(3, 6, 7, 7)
    with torch.inference_mode():
        layer(x[:1])
        layer(x)
    out = layer(x)  # the buffers made under inference mode are written again with autograd on
    out.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_accelerator_rules_run_on_the_cpu_match_reference(grad, monkeypatch):
    """The non-CPU rules ("experts" up to 196 output positions, whole folded chunks), run on the CPU so CI checks
    their numbers: float64 against the reference, and under bfloat16 autocast."""
    import dyconv.functional

    monkeypatch.setattr(_chunked, "CPU_RULES", ())
    experts = []
    real = dyconv.functional.conv_experts
    monkeypatch.setattr(dyconv.functional, "conv_experts", lambda *args: experts.append(1) or real(*args))
    for size, uses_experts in ((10, True), (15, False)):  # 100 output positions, 225
        experts.clear()
        layer = DynamicConv2d(8, 16, 3, padding=1, num_experts=3, dtype=torch.float64)
        x = torch.randn(4, 8, size, size, dtype=torch.float64, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            out = layer(x)
            ref = per_sample_reference(layer, x)
        torch.testing.assert_close(out, ref, **TOL[torch.float64])
        if grad:
            assert_gradients_match_loop(layer, x, out)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            low = copy.deepcopy(layer).float()(x.detach().float().requires_grad_(grad))
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), ref.detach().float(), **TOL[torch.bfloat16])
        assert bool(experts) == uses_experts


@pytest.mark.parametrize("device,expected", [
    ("cpu", ["tiles"]),  # one sample's kernel (2.4M) exceeds a chunk (2M): tiles of the output channels
    ("meta", ["one folded chunk"]),  # any other device (meta standing in): the 8 samples in one folded chunk
])
def test_chunks_tiles_and_per_sample_are_for_the_cpu(device, expected, monkeypatch):
    monkeypatch.setattr(_chunked, "CPU_RULES", ("cpu",))
    calls = []
    tiled, conv_chunk = _chunked._tiled_forward, _chunked._conv_chunk

    def spy_conv_chunk(x, *args):
        per_sample = len(args) == 8 and args[-1]
        calls.append("per sample" if per_sample else "one folded chunk" if x.shape[0] == 8 else "a folded chunk")
        return conv_chunk(x, *args)

    monkeypatch.setattr(_chunked, "_tiled_forward", lambda *args: calls.append("tiles") or tiled(*args))
    monkeypatch.setattr(_chunked, "_conv_chunk", spy_conv_chunk)
    layer = DynamicConv2d(512, 512, 3, padding=1, num_experts=4, device=device)
    with torch.no_grad():
        out = layer(torch.randn(8, 512, 16, 16, device=device))  # 256 positions: "chunked" on any device
    assert out.shape == (8, 512, 16, 16)
    assert calls[:1] == expected


def test_workspace_is_per_thread_and_cpu_only():
    import threading

    main = _chunked.workspace(10, torch.zeros(1))
    other = []
    t = threading.Thread(target=lambda: other.append(_chunked.workspace(10, torch.zeros(1))))
    t.start()
    t.join()
    assert main.data_ptr() != other[0].data_ptr()
    assert _chunked.workspace(10, torch.zeros(1)).data_ptr() == main.data_ptr()  # reused
    assert _chunked.workspace(10, torch.zeros(1, device="meta")) is None


@pytest.mark.parametrize("kernel_size,bias", [(3, True), (1, False), (1, True)])
def test_chunked_gradcheck(tiny_chunks, kernel_size, bias):
    x = torch.randn(5, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 2, kernel_size, kernel_size, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True) if bias else None
    a = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    pad = [kernel_size // 2] * 4

    def fn(x, w, a, b):
        return dynamic_conv(x, w, b, a, [1, 1], pad, [1, 1], 1, "zeros", "chunked")

    assert torch.autograd.gradcheck(fn, (x, w, a, b), fast_mode=True)


@pytest.mark.parametrize("kernel_size,groups", [(3, 1), (1, 1), (3, 8), (1, 2)])
def test_chunked_channels_last_forward_and_backward(tiny_chunks, per_sample, kernel_size, groups):
    layer = DynamicConv2d(8, 8, kernel_size, padding=kernel_size // 2, groups=groups, dtype=torch.float64)
    x = torch.randn(5, 8, 6, 7, dtype=torch.float64)
    ref = per_sample_reference(layer, x)
    ref_grads = torch.autograd.grad(run(layer, x, "loop").sin().sum(), [layer.weight, layer.bias])
    layer_cl = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    if kernel_size > 1 and groups == 1:  # the experts themselves are channels_last: mixed without a copy
        assert not layer_cl.weight.is_contiguous()
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    out = run(layer_cl, x_cl, "chunked")
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    grads = torch.autograd.grad(out.sin().sum(), [layer_cl.weight, layer_cl.bias])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


@pytest.mark.parametrize("strategy", ["experts", "unfold_experts", "scaled_inputs"])
@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_k_kernel_strategies_keep_channels_last(strategy, rank, case, batch):
    """The K-kernel strategies on channels_last input mix the K outputs from channels-last memory: output and every
    gradient against the reference and the "loop" strategy, and in 2-D a channels_last output, as a static
    convolution returns for such input (they once copied the K outputs to the contiguous format and returned a
    contiguous output into a channels_last network). In 3-D the output follows the convolution they run (the
    CPU's dense float64 conv3d returns contiguous output for channels_last_3d input, its depthwise one does not)."""
    layer, x = strategy_case(strategy, rank, case, batch)
    fmt = torch.channels_last if rank == 2 else torch.channels_last_3d
    x_cl = x.contiguous(memory_format=fmt).requires_grad_()
    out = run(layer, x_cl, strategy)
    torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
    if rank == 2 and out[0, 0].numel() > 1:  # (with one output position both formats hold at once)
        assert out.is_contiguous(memory_format=fmt) and not out.is_contiguous()
    assert_gradients_match_loop(layer, x_cl, out)


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("case", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, dilation=2, padding=2),
                                  dict(kernel_size=2, padding=0, bias=False)], ids=str)
@pytest.mark.parametrize("out_channels", [8, 16])  # depth multiplier 1 and 2
def test_depthwise_channels_last_folds_in_channels_last(tiny_chunks, monkeypatch, rank, case, out_channels):
    """Folded depthwise chunks of channels_last input are convolved in channels_last (the chunk moved to
    (*spatial, n, C) memory), forward and backward: output and every gradient against the reference, the path
    taken for every chunk, a channels_last output and input gradient."""
    monkeypatch.setattr(_chunked, "PER_SAMPLE_MIN_POSITIONS", 10**9)
    calls = []
    real = _chunked._folded_channels_last
    monkeypatch.setattr(_chunked, "_folded_channels_last", lambda *args: calls.append(args[0].shape[0]) or real(*args))
    layer = LAYER[rank](8, out_channels, groups=8, **case, num_experts=3, temperature=2.0, dtype=torch.float64)
    fmt = torch.channels_last if rank == 2 else torch.channels_last_3d
    x = torch.randn(5, 8, *SPATIAL[rank], dtype=torch.float64)
    ref = per_sample_reference(layer, x)
    x_cl = x.contiguous(memory_format=fmt).requires_grad_()
    with torch.no_grad():
        out = run(layer, x_cl, "chunked")
    assert calls == [2, 2, 1]  # every chunk (tiny_chunks: 2 samples each) took the path
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    backward_calls = []
    real_backward = _chunked._folded_channels_last_backward
    monkeypatch.setattr(_chunked, "_folded_channels_last_backward",
                        lambda *args: backward_calls.append(args[1].shape[0]) or real_backward(*args))
    out = run(layer, x_cl, "chunked")  # with gradients: the custom function's forward takes it too
    assert len(calls) == 6
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    assert_gradients_match_loop(layer, x_cl, out)
    assert backward_calls == [3, 2]  # and backward, every chunk (3 samples each)
    # an output gradient in the other format (the fold copies whatever it gets)
    params = [p for p in (x_cl, layer.weight, layer.bias, *layer.router.parameters()) if p is not None]
    g = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad(run(layer, x_cl, "chunked"), params, g)
    ref_grads = torch.autograd.grad(run(layer, x_cl, "loop"), params, g)
    assert len(backward_calls) == 4
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    assert grads[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("case", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, dilation=2, padding=2)],
                         ids=str)
@pytest.mark.parametrize("out_channels", [8, 16])
@pytest.mark.parametrize("piece", [1, 2])
def test_depthwise_channels_last_folds_in_pieces(tiny_chunks, monkeypatch, rank, case, out_channels, piece):
    """A folded channels_last depthwise chunk is convolved ``_fold_pieces`` samples at a time, forward and backward
    (pieces that do not divide the chunks): output and every gradient against the reference and "loop", the size
    and workspace slot of every fold, channels_last output and input gradient."""
    monkeypatch.setattr(_chunked, "PER_SAMPLE_MIN_POSITIONS", 10**9)
    monkeypatch.setattr(_chunked, "_fold_pieces", lambda x, out_spatial, out_channels: min(piece, x.shape[0]))
    folds = []
    real = _chunked._fold_channels_last
    monkeypatch.setattr(_chunked, "_fold_channels_last", lambda x, slot: folds.append((x.shape[0], slot)) or real(x, slot))
    layer = LAYER[rank](8, out_channels, groups=8, **case, num_experts=3, temperature=2.0, dtype=torch.float64)
    fmt = torch.channels_last if rank == 2 else torch.channels_last_3d
    x = torch.randn(5, 8, *SPATIAL[rank], dtype=torch.float64)
    ref = per_sample_reference(layer, x)
    x_cl = x.contiguous(memory_format=fmt).requires_grad_()
    _chunked.clear_workspaces()
    out = run(layer, x_cl, "chunked")
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    assert out.is_contiguous(memory_format=fmt)
    # forward chunks of 2, 2, 1 samples (tiny_chunks), each in pieces of at most `piece`, the input in slot 3
    assert folds == ([(1, 3)] * 5 if piece == 1 else [(2, 3), (2, 3), (1, 3)])
    folds.clear()
    assert_gradients_match_loop(layer, x_cl, out)
    # backward chunks of 3 and 2: the output gradient (slot 3) and the input (slot 4) of every piece
    pieces = [1] * 5 if piece == 1 else [2, 1, 2]
    assert folds == [f for n in pieces for f in ((n, 3), (n, 4))]
    (grad_x,) = torch.autograd.grad(run(layer, x_cl, "chunked").sum(), x_cl)
    assert grad_x.is_contiguous(memory_format=fmt)
    slots = {key[2] for key in _chunked.thread_state().cache}
    assert ({3, 4} <= slots) == (piece > 1)  # one-sample pieces are views: no workspace


def test_fold_pieces_budget(monkeypatch):
    """As many samples per piece as keep the piece's input plus output elements within FOLD_CHUNK_ELEMENTS; at
    least one, at most the chunk."""
    x = torch.zeros(5, 8, 6, 6).contiguous(memory_format=torch.channels_last)  # 288 input elements per sample
    per_sample = 288 + 8 * 3 * 3  # stride 2: a 3x3 output of 8 channels
    for budget, pieces in [(2 * per_sample, 2), (2 * per_sample - 1, 1), (1, 1), (10**9, 5)]:
        monkeypatch.setattr(_chunked, "FOLD_CHUNK_ELEMENTS", budget)
        assert _chunked._fold_pieces(x, [3, 3], 8) == pieces
    monkeypatch.setattr(_chunked, "FOLD_CHUNK_ELEMENTS", 3 * (288 + 16 * 36))  # depth multiplier 2, stride 1
    assert _chunked._fold_pieces(x, [6, 6], 16) == 3


def test_fold_of_one_sample_is_a_view():
    x = torch.randn(3, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    folded = _chunked._fold_channels_last(x[1:2], 3)
    assert folded.shape == (1, 8, 5, 6) and folded.data_ptr() == x[1].data_ptr()
    torch.testing.assert_close(folded, x[1:2], rtol=0, atol=0)
    folded = _chunked._fold_channels_last(x[1:3], 3)  # two samples: (5, 6, 2, 8) memory, the channels of both
    assert folded.shape == (1, 16, 5, 6) and folded.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(folded[0, 8:], x[2], rtol=0, atol=0)
    torch.testing.assert_close(folded[0, :8], x[1], rtol=0, atol=0)


def test_channels_last_fold_only_for_depthwise_on_the_cpu():
    x = torch.zeros(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert _chunked._folds_channels_last(x, 8)
    assert not _chunked._folds_channels_last(x, 4)  # grouped, two channels per group: the plain fold
    assert not _chunked._folds_channels_last(x, 1)  # dense: the plain fold
    assert not _chunked._folds_channels_last(x.contiguous(), 8)  # contiguous: the fold is a view
    meta = torch.zeros(2, 8, 5, 5, device="meta")  # meta follows the CPU's rules (dyconv.profile)
    assert not _chunked._folds_channels_last(meta, 8)
    assert _chunked._folds_channels_last(meta.to(memory_format=torch.channels_last), 8)


def largest_saved_tensor(layer, x, strategy):
    """The largest number of elements autograd saves for backward in one call of the layer."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(layer, x, strategy).sum()
    return max(sizes)


@pytest.mark.parametrize("kernel_size", [3, 1])
def test_chunked_does_not_keep_per_sample_kernels_for_backward(kernel_size):
    batch = 16
    layer = DynamicConv2d(32, 32, kernel_size, padding=kernel_size // 2, num_experts=4)
    x = torch.randn(batch, 32, 4, 4, requires_grad=True)
    per_sample_kernels = batch * layer.weight[0].numel()
    # the plain batch-as-groups strategy does keep them: the measurement sees them
    assert largest_saved_tensor(layer, x, "groups") >= per_sample_kernels
    saved = largest_saved_tensor(layer, x, "chunked")
    assert saved < per_sample_kernels
    assert saved <= max(x.numel(), layer.weight.numel())


def test_chunked_bias_free_and_frozen_inputs():
    layer = DynamicConv2d(4, 6, 3, padding=1, bias=False, dtype=torch.float64)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)  # no gradient for the input
    out = run(layer, x, "chunked")
    torch.testing.assert_close(out, per_sample_reference(layer, x), **TOL[torch.float64])
    (g,) = torch.autograd.grad(out.sum(), [layer.weight])
    (r,) = torch.autograd.grad(run(layer, x, "loop").sum(), [layer.weight])
    torch.testing.assert_close(g, r, **TOL[torch.float64])


@pytest.mark.parametrize("kernel_size", [3, 1])
def test_scripted_layer_matches_eager(kernel_size):
    layer = DynamicConv2d(4, 6, kernel_size, padding=kernel_size // 2, dtype=torch.float64)
    scripted = torch.jit.script(layer)
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(scripted(x), per_sample_reference(layer, x), **TOL[torch.float64])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), layer(x), **TOL[torch.float64])
    scripted(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_traced_layer_uses_a_batch_generic_strategy(monkeypatch):
    import dyconv.functional

    picked = []
    original = dyconv.functional.select_strategy

    def spy(*args):
        picked.append(original(*args))
        return picked[-1]

    monkeypatch.setattr(dyconv.functional, "select_strategy", spy)
    layer = DynamicConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    traced = torch.jit.trace(layer, torch.randn(2, 4, 7, 7, dtype=torch.float64), check_trace=False)
    assert picked and all(p in BATCH_GENERIC_STRATEGIES for p in picked)
    x = torch.randn(5, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(traced(x), per_sample_reference(layer, x), **TOL[torch.float64])


@pytest.mark.parametrize("kernel_size", [3, 1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_chunked_output_can_be_modified_in_place(kernel_size, channels_last):
    layer = DynamicConv2d(4, 6, kernel_size, padding=kernel_size // 2, dtype=torch.float64)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    if channels_last:
        layer, x = layer.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    (ref,) = torch.autograd.grad(run(layer, x, "loop").relu().sum(), [layer.weight])
    out = run(layer, x, "chunked")
    torch.relu_(out)  # an in-place activation right after the layer, as in many models
    (grad,) = torch.autograd.grad(out.sum(), [layer.weight])
    torch.testing.assert_close(grad, ref, **TOL[torch.float64])
