"""Random paged batches for the kernel tests: shuffled block tables, NaN-poisoned caches.

Sequence s has seq_lens[s] context tokens, the last q_lens[s] of which are this
step's queries (q_len < seq_len: a chunk after a cached prefix; q_len == 1: a decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmservice.kernels.kv_cache import write_kv_cache_torch


@dataclass
class PagedBatch:
    q: torch.Tensor  # (num_q_tokens, num_heads, head_dim), a strided view of a fused qkv like the model's
    k_cache: torch.Tensor  # (num_blocks, block_size, num_heads, head_dim), NaN outside the written context
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor  # (num_seqs + 1,) int32
    seq_lens: torch.Tensor  # (num_seqs,) int32
    block_tables: torch.Tensor  # (num_seqs, max_blocks) int32, padded with -1


def qkv_views(num_tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    """q, k, v as the model makes them: strided views of one (T, 3 * C) projection."""
    qkv = torch.randn(num_tokens, 3 * num_heads * head_dim, generator=gen).to(dtype)
    return qkv.view(num_tokens, 3, num_heads, head_dim).unbind(1)


def make_paged_batch(seq_lens: list[int], q_lens: list[int], block_size: int, num_heads: int, dtype: torch.dtype,
                     gen: torch.Generator, head_dim: int = 64, spare_blocks: int = 3) -> PagedBatch:
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    ids = torch.randperm(num_blocks, generator=gen).int()  # scattered, not in sequence order
    tables = torch.full((len(seq_lens), max(blocks_per_seq) + 1), -1, dtype=torch.int32)
    taken = 0
    for s, n in enumerate(blocks_per_seq):
        tables[s, :n] = ids[taken:taken + n]
        taken += n
    k_cache = torch.full((num_blocks, block_size, num_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    slots = torch.cat([
        tables[s, torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
        for s, n in enumerate(seq_lens)
    ])
    _, k, v = qkv_views(len(slots), num_heads, head_dim, dtype, gen)
    write_kv_cache_torch(k, v, k_cache, v_cache, slots)
    q, _, _ = qkv_views(sum(q_lens), num_heads, head_dim, dtype, gen)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens).cumsum(0)
    return PagedBatch(q, k_cache, v_cache, cu, torch.tensor(seq_lens, dtype=torch.int32), tables)


def tolerance(dtype: torch.dtype) -> dict:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}
