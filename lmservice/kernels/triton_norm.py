"""Triton residual add fused with LayerNorm; reference: lmservice/kernels/norm.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_layer_norm_kernel(
    X, RESIDUAL, WEIGHT, BIAS, OUT, H, n_cols, eps,
    stride_x, stride_r, stride_o, stride_h,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One row: h = x + residual (stored), out = layer_norm(h), statistics in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(RESIDUAL + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h_stored = h.to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h_stored, mask=mask)
        h = h_stored.to(tl.float32)  # normalise exactly what the residual stream holds, as the reference does
    mean = tl.sum(h, 0) / n_cols
    centered = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 0) / n_cols + eps)
    w = tl.load(WEIGHT + cols, mask=mask).to(tl.float32)
    b = tl.load(BIAS + cols, mask=mask).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (centered * rstd * w + b).to(OUT.dtype.element_ty), mask=mask)


def add_layer_norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (or x when residual is None); returns (layer_norm(h), h).
    x, residual: (num_tokens, hidden), rows may be strided, columns contiguous."""
    num_tokens, hidden = x.shape
    assert x.stride(1) == 1, "x columns must be contiguous"
    assert weight.shape == bias.shape == (hidden,), f"weight/bias must be ({hidden},)"
    assert weight.is_contiguous() and bias.is_contiguous()
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1, f"residual {tuple(residual.shape)} vs x"
        assert residual.dtype == x.dtype, f"residual {residual.dtype} vs x {x.dtype}"
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = x if residual is None else torch.empty_like(out)
    if num_tokens == 0:
        return out, h
    block_n = triton.next_power_of_2(hidden)
    _add_layer_norm_kernel[(num_tokens,)](
        x, x if residual is None else residual, weight, bias, out, h, hidden, eps,
        x.stride(0), x.stride(0) if residual is None else residual.stride(0), out.stride(0), h.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, num_warps=min(16, max(1, block_n // 256)),
    )
    return out, h
