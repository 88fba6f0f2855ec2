"""benchmarks/dense_experts.py times the dense kernel with 1, 2 and 4 experts: each side computes the convolution
with its experts mixed by its attention (with one expert, that expert's own convolution)."""

import pytest
import torch
import torch.nn.functional as F

import benchmark_scripts
from dyconv.benchmark import LayerShape
# _kernel_loaded: the autouse fixture that loads the kernel before each test, here too
from test_cpu_kernel import _kernel_loaded, needs_kernel  # noqa: F401

dense_experts = benchmark_scripts.load("dense_experts")


@needs_kernel
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_sides_compute_the_mixed_convolution(memory_format):
    shape = LayerShape("tiny", 8, 6, 3, 5)
    fns = dense_experts.sides(shape, 2, memory_format)
    x, experts = dense_experts.operands(shape, 2, memory_format)
    assert list(fns) == ["static", "1 expert", "2 experts", "4 experts"]
    torch.testing.assert_close(experts[1][1], torch.ones(2, 1))
    with torch.inference_mode():
        assert fns["static"]().shape == (2, 6, 5, 5)
        for count, (w, a) in experts.items():
            expected = torch.cat([F.conv2d(x[b:b + 1], torch.einsum("k,koihw->oihw", a[b], w), padding=1)
                                  for b in range(2)])
            got = fns[f"{count} expert{'s' if count > 1 else ''}"]()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_main_rejects_shapes_it_cannot_time():
    with pytest.raises(SystemExit):
        dense_experts.main(["--layers", "dw3x3"])
