"""Triton bias add fused with GELU (tanh approximation); reference: lmservice/kernels/activation.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _bias_gelu_kernel(X, BIAS, OUT, n_cols, stride_x, stride_o, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        # rounded to the storage dtype like the reference's x + bias
        x = (x.to(tl.float32) + tl.load(BIAS + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    x = x.to(tl.float32)
    # 0.5 * x * (1 + tanh(u)) == x * sigmoid(2u): no tanh, which the interpreter lacks (no libdevice)
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    # floor: sigmoid(-80) is 0 to fp32 anyway, and exp(80+) would overflow to inf on the way
    y = x * tl.sigmoid(tl.maximum(2.0 * u, -80.0))
    tl.store(OUT + row * stride_o + cols, y.to(OUT.dtype.element_ty), mask=mask)


def bias_gelu_triton(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu_tanh(x + bias); x: (num_tokens, n) with contiguous columns, bias: (n,)."""
    num_tokens, n = x.shape
    assert x.stride(1) == 1, "x columns must be contiguous"
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous(), f"bias must be ({n},)"
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    block_n = min(1024, triton.next_power_of_2(n))
    _bias_gelu_kernel[(num_tokens, triton.cdiv(n, block_n))](
        x, x if bias is None else bias, out, n, x.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, num_warps=4,
    )
    return out
