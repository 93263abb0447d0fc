"""Triton residual add + LayerNorm vs add_layer_norm_torch."""

from __future__ import annotations

import pytest
import torch

from lmservice.kernels.norm import add_layer_norm_torch
from lmservice.kernels.triton_norm import add_layer_norm_triton
from tests.kernels.paged_batch import tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [768, 100])  # GPT-2 small and a non-power-of-two width
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layer_norm_matches_reference(dtype, hidden, with_residual, gen):
    wide = (torch.randn(7, hidden + 5, generator=gen) * 3 + 1).to(dtype)
    x = wide[:, 2:hidden + 2]  # strided rows, as a slice of a wider activation
    residual = torch.randn(7, hidden, generator=gen).to(dtype) if with_residual else None
    weight = torch.randn(hidden, generator=gen).to(dtype)
    bias = torch.randn(hidden, generator=gen).to(dtype)
    out, h = add_layer_norm_triton(x, residual, weight, bias, 1e-5)
    ref_out, ref_h = add_layer_norm_torch(x, residual, weight, bias, 1e-5)
    torch.testing.assert_close(h, ref_h, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, **tolerance(dtype))


def test_single_row(gen):
    x, r = torch.randn(2, 1, 64, generator=gen)
    w, b = torch.ones(64), torch.zeros(64)
    torch.testing.assert_close(add_layer_norm_triton(x, r, w, b, 1e-5), add_layer_norm_torch(x, r, w, b, 1e-5))
