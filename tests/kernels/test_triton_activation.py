"""Triton bias + GELU(tanh) vs bias_gelu_torch, saturated tails included."""

from __future__ import annotations

import pytest
import torch

from lmservice.kernels.activation import bias_gelu_torch
from lmservice.kernels.triton_activation import bias_gelu_triton
from tests.kernels.paged_batch import tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("num_tokens", "n"), [(3, 3072), (5, 100)])  # crosses the 1024-wide tiles; ragged
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_matches_reference(dtype, num_tokens, n, with_bias, gen):
    x = (torch.randn(num_tokens, n, generator=gen) * 4).to(dtype)
    x[0, :4] = torch.tensor([-30.0, 30.0, -8.0, 0.0], dtype=dtype)  # sigmoid saturation, zero
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    torch.testing.assert_close(bias_gelu_triton(x, bias), bias_gelu_torch(x, bias), **tolerance(dtype))
