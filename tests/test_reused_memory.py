"""The compiled CPU kernel's reused memory (``csrc/reused_memory.cpp``): the experts' gradient of a large layer from
``dense_backward`` comes from a pool that keeps given-back blocks for the next backward of the same size, instead of
memory mapped afresh on every training step; its values stay the reference's, the pool's counts follow what tensors
hold, and memory profiles (the bench's peak training memory) count the block while a tensor holds it."""

import torch

from dyconv import DynamicConv2d, _cpu_kernel
from dyconv.benchmark import peak_training_memory
# _kernel_loaded: the autouse fixture that loads the kernel before each test, here too
from test_cpu_kernel import _kernel_loaded, needs_kernel  # noqa: F401
from test_functional import run
from reference import TOL

MIN_BYTES = 4 << 20  # kReusedMinBytes


def reused_bytes():
    """(bytes held by tensors, bytes kept for reuse)."""
    return _cpu_kernel.reused_memory_bytes()


def large_layer():
    """A layer whose experts' gradient takes 3 x 192 x 192 x 9 float64 = 7.96 MB (at least the pool's 4 MiB)."""
    torch.manual_seed(0)
    layer = DynamicConv2d(192, 192, 3, padding=1, num_experts=3, temperature=2.0, dtype=torch.float64)
    x = torch.randn(2, 192, 5, 5, dtype=torch.float64)
    assert layer.weight.numel() * 8 >= MIN_BYTES
    return layer, x


def expert_gradient(layer, x, strategy="dense_kernel"):
    layer.zero_grad(set_to_none=True)
    run(layer, x, strategy).sin().sum().backward()
    return layer.weight.grad


@needs_kernel
def test_large_expert_gradients_come_from_reused_memory():
    _cpu_kernel.release_reused_memory()
    held, kept = reused_bytes()
    assert kept == 0
    layer, x = large_layer()
    nbytes = layer.weight.numel() * 8
    expected = expert_gradient(layer, x, "loop").clone()
    grad = expert_gradient(layer, x)
    torch.testing.assert_close(grad, expected, **TOL[torch.float64])
    assert reused_bytes() == (held + nbytes, 0)  # held by the gradient
    first = grad.data_ptr()
    del grad
    layer.zero_grad(set_to_none=True)
    assert reused_bytes() == (held, nbytes)  # given back, kept
    grad = expert_gradient(layer, x)
    assert grad.data_ptr() == first  # the same block again
    assert reused_bytes() == (held + nbytes, 0)
    torch.testing.assert_close(grad, expected, **TOL[torch.float64])
    grad.mul_(2.0)  # a plain tensor: in-place updates (optimizers) work
    del grad
    layer.zero_grad(set_to_none=True)
    _cpu_kernel.release_reused_memory()
    assert reused_bytes() == (held, 0)


@needs_kernel
def test_small_gradients_use_the_default_allocator():
    _cpu_kernel.release_reused_memory()
    before = reused_bytes()
    layer = DynamicConv2d(16, 16, 3, padding=1, num_experts=3, dtype=torch.float64)
    grad = expert_gradient(layer, torch.randn(2, 16, 5, 5, dtype=torch.float64))
    assert grad is not None and reused_bytes() == before


@needs_kernel
def test_memory_profiles_count_the_block():
    """The bench's peak training memory (PyTorch's allocator events) sees the block the backward takes from the pool,
    whether the pool had it kept (the second step) or not (the first)."""
    _cpu_kernel.release_reused_memory()
    layer, x = large_layer()
    nbytes = layer.weight.numel() * 8
    for _ in range(2):
        assert peak_training_memory(lambda: expert_gradient(layer, x)) >= nbytes
        layer.zero_grad(set_to_none=True)
    _cpu_kernel.release_reused_memory()
