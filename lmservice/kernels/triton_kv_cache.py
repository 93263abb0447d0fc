"""Triton KV-cache write: K and V of the step's tokens into their slots, one launch per layer.

Layout, slot convention and storage formats as in lmservice/kernels/kv_cache.py (the torch reference):
slot = block_id * block_size + row; NOTE: slot -1 marks padding and is skipped. Float caches take the values
converted (round to nearest even); int8 caches the values quantized per token and head, with their scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_row(CACHE, SCALES, dst, scale_dst, x, mask, head_mask, IS_INT8: tl.constexpr):
    """One token's heads (H, D) into the cache; int8: quantize_kv_int8's values and scales, bit for bit."""
    if IS_INT8:
        x = x.to(tl.float32)
        bad = tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), 1) > 0  # NaN or infinity in the head
        scale = tl.max(tl.abs(x), 1) * (1.0 / 127.0)  # (H,)
        inv = tl.where(scale > 0, 1.0 / tl.where(scale > 0, scale, 1.0), 0.0)
        y = x * inv[:, None]
        low = tl.floor(y)
        frac = y - low
        low_is_odd = low - 2.0 * tl.floor(low * 0.5) != 0.0
        q = tl.where((frac > 0.5) | ((frac == 0.5) & low_is_odd), low + 1.0, low)  # round half to even
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        q = tl.where(bad[:, None], 0.0, q)
        tl.store(CACHE + dst, q.to(tl.int8), mask=mask)
        tl.store(SCALES + scale_dst, tl.where(bad, float("nan"), scale), mask=head_mask)
    else:
        tl.store(CACHE + dst, x.to(CACHE.dtype.element_ty), mask=mask)


@triton.jit
def _write_kv_kernel(
    KEY, VALUE, K_CACHE, V_CACHE, K_SCALES, V_SCALES, SLOT_MAPPING, num_heads,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cr, stride_ch, stride_sb, stride_sr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, IS_INT8: tl.constexpr,
):
    """One token: all its heads' K and V rows."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOT_MAPPING + token).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    head_mask = offs_h < num_heads
    mask = head_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cr + offs_h[:, None] * stride_ch + offs_d[None, :]
    scale_dst = (slot // BLOCK_SIZE) * stride_sb + (slot % BLOCK_SIZE) * stride_sr + offs_h  # (H,), int8 only
    k = tl.load(KEY + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask,
                other=0.0)  # (H, D)
    _store_row(K_CACHE, K_SCALES, dst, scale_dst, k, mask, head_mask, IS_INT8)
    v = tl.load(VALUE + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask,
                other=0.0)  # (H, D)
    _store_row(V_CACHE, V_SCALES, dst, scale_dst, v, mask, head_mask, IS_INT8)


def write_kv_cache_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> None:
    """key, value: (num_tokens, num_heads, head_dim), any token/head strides (e.g. views of a
    fused qkv projection); slot_mapping: (num_tokens,) int; k_scales, v_scales (num_blocks, block_size,
    num_heads) fp32 for an int8 cache. No host sync: CUDA-graph capturable."""
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
    is_int8 = k_cache.dtype == torch.int8
    if is_int8:
        assert k_scales is not None and v_scales is not None, "an int8 KV cache needs its scales"
        assert k_scales.shape == v_scales.shape == k_cache.shape[:3] and k_scales.stride() == v_scales.stride()
        assert k_scales.dtype == v_scales.dtype == torch.float32 and k_scales.stride(2) == 1
    else:
        k_scales = v_scales = k_cache  # unused by the kernel
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, k_scales, v_scales, slot_mapping, num_heads,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scales.stride(0), k_scales.stride(1),
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_heads), IS_INT8=is_int8,
    )
