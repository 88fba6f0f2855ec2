"""The forms that benchmarks/floors.py times as lower bounds compute what they stand for (a bound measured on a
wrong computation would bound nothing)."""

import pytest
import torch
import torch.nn.functional as F

from dyconv.benchmark import LayerShape
import benchmark_scripts

floors = benchmark_scripts.load("floors")

SHAPES = [LayerShape("3x3", 4, 6, 3, 5), LayerShape("3x3 stride 2", 4, 6, 3, 6, stride=2),
          LayerShape("depthwise", 4, 8, 3, 5, groups=4), LayerShape("1x1", 4, 6, 1, 5)]
FORMATS = [torch.contiguous_format, torch.channels_last]


def per_sample_reference(shape, x, kernels):
    """Sample b convolved with kernels[b] by F.conv2d, one sample at a time."""
    return torch.cat([F.conv2d(x[b : b + 1], kernels[b], None, shape.stride, shape.kernel_size // 2, 1, shape.groups)
                      for b in range(x.shape[0])])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("memory_format", FORMATS, ids=str)
def test_per_sample_forms(shape, chunk, memory_format):
    batch = 5
    kernels = torch.randn(batch, shape.out_channels, shape.in_channels // shape.groups, shape.kernel_size,
                          shape.kernel_size, dtype=torch.float64)
    x = torch.randn(batch, shape.in_channels, shape.size, shape.size, dtype=torch.float64)
    x = x.contiguous(memory_format=memory_format)
    ref = per_sample_reference(shape, x, kernels)
    leaves = [kernels[s : s + chunk].reshape(-1, *kernels.shape[2:]) for s in range(0, batch, chunk)]
    torch.testing.assert_close(floors._per_sample(shape, chunk, leaves)(x), ref)
    if shape.kernel_size == 1 and shape.stride == 1 and shape.groups == 1:
        torch.testing.assert_close(floors._bmm(shape, kernels.reshape(batch, shape.out_channels, -1))(x), ref)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s.groups == 1], ids=lambda s: s.name)
@pytest.mark.parametrize("memory_format", FORMATS, ids=str)
def test_k_kernels_matrix_product_is_the_k_fold_convolution(shape, memory_format):
    experts = torch.randn(3 * shape.out_channels, shape.in_channels, shape.kernel_size, shape.kernel_size,
                          dtype=torch.float64)
    x = torch.randn(2, shape.in_channels, shape.size, shape.size, dtype=torch.float64)
    x = x.contiguous(memory_format=memory_format)
    conv = F.conv2d(x, experts, None, shape.stride, shape.kernel_size // 2)  # (B, K * C_out, H, W)
    product = floors._k_kernels_gemm(shape, experts)(x)  # (B * L, K * C_out)
    torch.testing.assert_close(product, conv.flatten(2).transpose(1, 2).reshape(-1, conv.shape[1]))


def test_every_form_runs_forward_and_backward():
    """One shape of each kind through sides(): every form in both formats, inference and the training step."""
    for shape in SHAPES:
        for train in (False, True):
            calls = floors.sides(shape, 3, train)
            names = {name for name, _ in calls}
            assert {"static", "dyconv", "K kernels, convolution"} <= names
            assert any(n.startswith("per-sample kernels, ") for n in names)
            for call in calls.values():
                call()
