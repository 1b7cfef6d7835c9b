"""The CPU fast path of the direction kernels' scalings (``_foreach_scale_``): the same bits as
``torch._foreach_mul_`` with a Python number, for every dtype it takes."""

from __future__ import annotations

import pytest
import torch

from extrap_accel.optim.sgd import _foreach_scale_

SHAPES = [(16, 3, 3, 3), (16,), (64, 64, 3, 3), (10, 64), (3001,), (700, 3000)]
VALUES = [0.9, -0.0123456789, 1 / 3, 1.0 - 1e-9, 7.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_scale_is_foreach_mul_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    for value in VALUES:
        want = [t.clone() for t in base]
        torch._foreach_mul_(want, value)
        for arg in (value, [value] * len(base)):  # one number, or equal numbers per tensor
            got = [t.clone() for t in base]
            _foreach_scale_(got, arg)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (dtype, value)
    # different numbers per tensor
    values = [VALUES[i % len(VALUES)] for i in range(len(base))]
    want = [t.clone() for t in base]
    torch._foreach_mul_(want, values)
    got = [t.clone() for t in base]
    _foreach_scale_(got, values)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
