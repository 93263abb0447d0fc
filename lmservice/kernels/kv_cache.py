"""The paged KV cache's storage formats and writing the K and V of new tokens into it (layout:
lmservice/kernels/attention.py).

A cache stores K and V in one of four formats (`--kv-cache-dtype`): float32, float16 or bfloat16 (converted on
write, round to nearest even; widened to fp32 on read), or int8 with one fp32 scale per token and head
(symmetric: scale = max |x| / 127 over the head's head_dim values, q = round_half_even(x / scale); read as
q * scale). The int8 scales live in a tensor of their own beside the values, (num_blocks, block_size, num_heads),
indexed by the same slots, so block tables, the prefix cache and preemption need not know the format.

NOTE: a head holding NaN or infinity is stored with a NaN scale and zeros (every format keeps non-finite values
non-finite), so a poisoned token makes its sequence's attention NaN, as fp32 would, and fails that request
alone. The torch functions here are the reference the C and Triton writes are tested against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

KV_CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
INT8_KV_SCALE_DTYPE = torch.float32
_INV_127 = 1.0 / 127.0  # NOTE: a multiplication, as in the C write (-ffast-math makes a division by 127 one)


class LayerKVCache(NamedTuple):
    """One layer's cache: k, v (num_blocks, block_size, num_heads, head_dim) in the storage dtype, and for int8
    the per-token-and-head scales k_scales, v_scales (num_blocks, block_size, num_heads) fp32 (else None).
    A plain (k, v) tuple is a float cache: LayerKVCache(*kv) reads either."""

    k: torch.Tensor
    v: torch.Tensor
    k_scales: torch.Tensor | None = None
    v_scales: torch.Tensor | None = None


def kv_cache_dtype(name: str) -> torch.dtype:
    """The storage dtype of a --kv-cache-dtype value other than auto; ValueError naming the choices."""
    try:
        return KV_CACHE_DTYPES[name]
    except KeyError:
        raise ValueError(f"kv_cache_dtype {name!r} is not one of auto, {', '.join(KV_CACHE_DTYPES)}") from None


def kv_bytes_per_token_head(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token's K (or V) of one head takes in `dtype`'s cache, its int8 scale included."""
    if dtype == torch.int8:
        return head_dim + torch.finfo(INT8_KV_SCALE_DTYPE).bits // 8
    return head_dim * torch.finfo(dtype).bits // 8


def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., head_dim) -> (q int8 (..., head_dim), scales fp32 (...)): symmetric per row, max |x| / 127, round
    half to even; a row of zeros has scale 0; a row with NaN or infinity gets a NaN scale and zeros."""
    x = x.float()
    scales = x.abs().amax(dim=-1) * _INV_127  # NaN where the row has one; inf where it has an infinity
    finite = torch.isfinite(scales)
    inv = torch.where(finite & (scales > 0), 1.0 / scales, 0.0)
    q = torch.round(x * inv[..., None]).clamp_(-127, 127)
    q = torch.where(finite[..., None], q, 0.0).to(torch.int8)
    return q, torch.where(finite, scales, float("nan"))


def widen_kv(x: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cache rows (..., num_heads, head_dim) in their storage dtype -> `dtype`; int8 rows times their scales
    (..., num_heads), in fp32."""
    if scales is None:
        return x.to(dtype)
    return (x.float() * scales.unsqueeze(-1)).to(dtype)


def write_kv_cache_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> None:
    """key, value: (num_tokens, num_heads, head_dim); slot_mapping: (num_tokens,) int,
    slot = block_id * block_size + row. NOTE: slot -1 marks padding and is skipped.
    Float caches take the values converted to their dtype; int8 caches (k_scales, v_scales given) take
    quantize_kv_int8's values and scales."""
    num_blocks, block_size, num_heads, head_dim = k_cache.shape
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    slots = slot_mapping.long()
    num_slots = num_blocks * block_size
    if k_cache.dtype == torch.int8:
        assert k_scales is not None and v_scales is not None, "an int8 KV cache needs its scales"
        for x, cache, scales in ((key, k_cache, k_scales), (value, v_cache, v_scales)):
            q, s = quantize_kv_int8(x)
            cache.view(num_slots, num_heads, head_dim).index_copy_(0, slots, q)
            scales.view(num_slots, num_heads).index_copy_(0, slots, s.to(scales.dtype))
        return
    k_cache.view(num_slots, num_heads, head_dim).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(num_slots, num_heads, head_dim).index_copy_(0, slots, value.to(v_cache.dtype))
