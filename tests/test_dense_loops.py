"""benchmarks/dense_loops.py times the dense kernel's two forward loops and its own choice: each side computes the
convolution with the experts mixed by the attention, plus the mixed bias."""

import pytest
import torch
import torch.nn.functional as F

import benchmark_scripts
from dyconv.benchmark import LayerShape
# _kernel_loaded: the autouse fixture that loads the kernel before each test, here too
from test_cpu_kernel import _kernel_loaded, needs_kernel  # noqa: F401

dense_loops = benchmark_scripts.load("dense_loops")


@needs_kernel
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("batch", [1, 8])  # "auto" takes each loop at one of them
def test_sides_compute_the_mixed_convolution(memory_format, batch):
    shape = LayerShape("tiny", 8, 70, 3, 5)  # a full block of 64 output channels and a partial one
    fns = dense_loops.sides(shape, batch, memory_format)
    x, w, a, bias = dense_loops.operands(shape, batch, memory_format)
    assert list(fns) == ["static", "grid", "channels", "auto"]
    with torch.inference_mode():
        assert fns["static"]().shape == (batch, 70, 5, 5)
        expected = torch.cat([F.conv2d(x[b:b + 1], torch.einsum("k,koihw->oihw", a[b], w), a[b] @ bias, padding=1)
                              for b in range(batch)])
        for loop in dense_loops.LOOPS:
            torch.testing.assert_close(fns[loop](), expected, rtol=1e-4, atol=1e-4)


def test_main_rejects_shapes_it_cannot_time():
    with pytest.raises(SystemExit):
        dense_loops.main(["--layers", "dw3x3"])


@needs_kernel
def test_main_prints_a_line_per_shape_format_and_batch(capsys):
    assert dense_loops.main(["--layers", "3x3 64", "--sizes", "3", "--batch-sizes", "1", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == [
        f"3x3 64->64 @3, {fmt}, b{b}" for fmt in ("contiguous", "channels_last") for b in (1, 2)]
    assert all("grid" in line and "channels" in line and "auto" in line for line in lines)
