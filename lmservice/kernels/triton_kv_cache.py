"""Triton KV-cache write: K and V of the step's tokens into their slots, one launch per layer.

Layout and slot convention as in lmservice/kernels/kv_cache.py (the torch reference):
slot = block_id * block_size + row; NOTE: slot -1 marks padding and is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    KEY, VALUE, K_CACHE, V_CACHE, SLOT_MAPPING, num_heads,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cr, stride_ch,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One token: all its heads' K and V rows."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOT_MAPPING + token).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < num_heads)[:, None]
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cr + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(KEY + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)  # (H, D)
    tl.store(K_CACHE + dst, k.to(K_CACHE.dtype.element_ty), mask=mask)
    v = tl.load(VALUE + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)  # (H, D)
    tl.store(V_CACHE + dst, v.to(V_CACHE.dtype.element_ty), mask=mask)


def write_kv_cache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key, value: (num_tokens, num_heads, head_dim), any token/head strides (e.g. views of a
    fused qkv projection); slot_mapping: (num_tokens,) int. No host sync: CUDA-graph capturable."""
    num_tokens, num_heads, head_dim = key.shape
    assert value.shape == key.shape, f"key {tuple(key.shape)} vs value {tuple(value.shape)}"
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "head_dim must be contiguous in key and value"
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_heads, head_dim), (
        f"cache {tuple(k_cache.shape)} does not match (num_heads, head_dim) {(num_heads, head_dim)}"
    )
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride() and k_cache.stride(-1) == 1
    assert v_cache.dtype == k_cache.dtype, f"cache dtypes differ: {k_cache.dtype}, {v_cache.dtype}"
    assert slot_mapping.shape == (num_tokens,) and not slot_mapping.is_floating_point(), "slot_mapping: (num_tokens,) int"
    assert head_dim & (head_dim - 1) == 0, f"head_dim {head_dim} must be a power of two"
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, num_heads,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_heads),
    )
