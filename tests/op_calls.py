"""The operators a call runs, as PyTorch's profiler records them: those called from C++ (the compiled batch-1
plan, ``csrc/one_sample.cpp``) as well as from Python, which monkeypatched spies would miss (used by several
tests)."""

import torch
from torch.profiler import ProfilerActivity, profile


def top_level_ops(fn):
    """``fn()``'s result and the names of the operators it called directly (``aten::conv2d``, not the
    convolution's own ``aten::convolution`` inside it; ``dyconv_cpu::one_sample_mix``), in order."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, [e.name for e in prof.events() if e.cpu_parent is None]
