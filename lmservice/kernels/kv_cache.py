"""Writing the K and V of new tokens into the paged cache (layout: lmservice/kernels/attention.py)."""

from __future__ import annotations

import torch


def write_kv_cache_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key, value: (num_tokens, num_heads, head_dim); slot_mapping: (num_tokens,) int,
    slot = block_id * block_size + row. NOTE: slot -1 marks padding and is skipped."""
    num_blocks, block_size, num_heads, head_dim = k_cache.shape
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    slots = slot_mapping.long()
    k_cache.view(num_blocks * block_size, num_heads, head_dim).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, num_heads, head_dim).index_copy_(0, slots, value.to(v_cache.dtype))
