"""torch.compile(dynamic=True): eager numbers, and one graph for every batch size (no recompiles)."""

import pytest
import torch
import torch._dynamo
import torch.fx.experimental._config as fx_config
from torch import nn
from torch._dynamo.utils import counters

import dyconv
from dyconv.export import check_parity

LAYER = {1: dyconv.DynamicConv1d, 2: dyconv.DynamicConv2d, 3: dyconv.DynamicConv3d}
SIZE = {1: 12, 2: 8, 3: 5}


def small_stack(rank):
    """A dense 3×3 (the 'unfold' path), a depthwise 3×3 ('experts') and a strided pointwise ('matmul') layer."""
    L = LAYER[rank]
    model = nn.Sequential(L(3, 8, 3, padding=1), nn.ReLU(), L(8, 8, 3, padding=1, groups=8), L(8, 6, 1, stride=2))
    dyconv.set_temperature(model, 1.0)
    return model.eval()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compile_and_check(model, shape, backend, warm_batch=2, batch_sizes=(3, 5, 7)):
    compiled = torch.compile(model, dynamic=True, backend=backend, fullgraph=True)
    with torch.no_grad():
        compiled(torch.randn(warm_batch, *shape))
    assert counters["stats"]["unique_graphs"] == 1
    # any further compilation for another batch size is an error from here on
    with torch.compiler.set_stance("fail_on_recompile"):
        report = check_parity(model, compiled, shape, batch_sizes=batch_sizes)
    assert report.ok, str(report)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("rank", [2, pytest.param(1, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_compile_dynamic_one_graph_for_all_batch_sizes(rank):
    # backend="eager": dynamo's capture, guards and strategy choice, without a code generator (fast)
    compile_and_check(small_stack(rank), (3,) + (SIZE[rank],) * rank, backend="eager")


def test_recompile_check_can_fail():
    """The check works: a static-shape compile does recompile for a new batch size, and is refused."""
    model = small_stack(2)
    compiled = torch.compile(model, dynamic=False, backend="eager")
    with torch.no_grad():
        compiled(torch.randn(2, 3, 8, 8))
        with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(Exception, match="ecompil"):
            compiled(torch.randn(3, 3, 8, 8))


def test_batch_one_without_recompile_when_size_oblivious():
    """Dynamo specialises sizes 0 and 1, so batch 1 compiles a second graph by default; with
    ``backed_size_oblivious`` it shares the graph of every other batch size."""
    old = fx_config.backed_size_oblivious
    fx_config.backed_size_oblivious = True
    try:
        compile_and_check(small_stack(2), (3, 8, 8), backend="eager", batch_sizes=(1, 3, 6))
    finally:
        fx_config.backed_size_oblivious = old


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_compile_inductor_parity(rank):
    compile_and_check(small_stack(rank), (3,) + (SIZE[rank],) * rank, backend="inductor")


@pytest.mark.slow
def test_compile_inductor_whole_network():
    from test_export import dy_network

    model, shape = dy_network()
    compile_and_check(model, shape, backend="inductor", batch_sizes=(3, 4))


@pytest.mark.slow
def test_compile_inductor_training_mode_layer():
    """With gradients: a single dynamic layer compiled with dynamic shapes matches eager, forward and backward."""
    layer = dyconv.DynamicConv2d(4, 6, 3, padding=1)
    compiled = torch.compile(layer, dynamic=True)
    for batch in (2, 3):
        x = torch.randn(batch, 4, 8, 8, requires_grad=True)
        out, expected = compiled(x), layer(x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        (g_compiled,) = torch.autograd.grad(out.square().sum(), x)
        (g_eager,) = torch.autograd.grad(expected.square().sum(), x)
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-5)
