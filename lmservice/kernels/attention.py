"""Paged attention over the KV cache: varlen prefill (and chunked prefill) and decode.

Cache layout, per layer (NOTE: shared by every kernel and the engine):
    k_cache, v_cache: (num_blocks, block_size, num_heads, head_dim)
    token t of a sequence lives in block block_table[t // block_size], row t % block_size.
    An int8 cache has k_scales, v_scales: (num_blocks, block_size, num_heads) beside it; narrow caches are
    widened to the query's dtype as they are read (storage formats: lmservice/kernels/kv_cache.py).

The torch functions here are both the reference the Triton kernels are tested
against and the CPU path of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmservice.kernels.kv_cache import widen_kv


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, scales: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """K or V of one sequence, contiguous, widened to `dtype`: (seq_len, num_heads, head_dim)."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    ids = block_table[:num_blocks].long()
    blocks = cache.index_select(0, ids).flatten(0, 1)[:seq_len]  # (L, nh, hd)
    return widen_kv(blocks, None if scales is None else scales.index_select(0, ids).flatten(0, 1)[:seq_len], dtype)


def prefill_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed query chunks against their whole paged context.

    q: (num_tokens, num_heads, head_dim), the queries of num_seqs sequences packed
    back to back (cu_seqlens_q: (num_seqs + 1,) offsets). seq_lens[s] is sequence s's
    context length including its queries, which are its last q_len positions; their
    K/V must already be in the cache. Returns (num_tokens, num_heads, head_dim).
    """
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q_start, q_end = starts[s], starts[s + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        k = _gather_context(k_cache, block_tables[s], seq_len, k_scales, q.dtype).transpose(0, 1)  # (nh, L, hd)
        v = _gather_context(v_cache, block_tables[s], seq_len, v_scales, q.dtype).transpose(0, 1)  # (nh, L, hd)
        qs = q[q_start:q_end].transpose(0, 1)  # (nh, q_len, hd)
        if q_len == seq_len:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale)
        else:
            # query i sits at position seq_len - q_len + i and sees keys 0..that position
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # (q_len, L)
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)
        out[q_start:q_end] = o.transpose(0, 1)
    return out


@dataclass(frozen=True)
class DecodePlan:
    """How the torch decode path reads one step's contexts, built once per step and shared by every layer.

    Each sequence's first `num_blocks` table entries are gathered as whole blocks (one contiguous copy
    per block, not one per token), so every sequence's context is padded to num_blocks * block_size rows.
    """

    block_ids: torch.Tensor  # (num_seqs * num_blocks,) int64; table padding (-1) reads block 0, then is masked
    stale_rows: torch.Tensor  # (num_stale,) int64: rows of the gathered context at or past their sequence's end
    mask: torch.Tensor  # (num_seqs, 1, 1, num_blocks * block_size) bool, True inside the context


def _gather_scales(scales: torch.Tensor, plan: DecodePlan, num_seqs: int, ctx_len: int) -> torch.Tensor:
    """An int8 cache's scales in the plan's gathered order: (num_seqs, ctx_len, num_heads)."""
    return scales.view(scales.shape[0], -1).index_select(0, plan.block_ids).view(num_seqs, ctx_len, -1)


def plan_decode_torch(seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> DecodePlan:
    device = block_tables.device
    num_blocks = -(-int(seq_lens.max()) // block_size)
    block_ids = block_tables[:, :num_blocks].clamp(min=0).long().flatten()
    valid = torch.arange(num_blocks * block_size, device=device)[None, :] < seq_lens.to(device)[:, None]  # (B, L)
    stale_rows = (~valid).flatten().nonzero().squeeze(1)
    return DecodePlan(block_ids, stale_rows, valid[:, None, None, :])


def decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    plan: DecodePlan | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence against its paged context.

    q: (num_seqs, num_heads, head_dim); seq_lens: (num_seqs,) context lengths
    including the query token (whose K/V is already in the cache). `plan` is
    plan_decode_torch(seq_lens, block_tables, block_size), made here when not
    given. Returns (num_seqs, num_heads, head_dim).
    """
    num_seqs, num_heads, head_dim = q.shape
    if plan is None:
        plan = plan_decode_torch(seq_lens, block_tables, k_cache.shape[1])
    ctx_len = plan.mask.shape[-1]
    # a 2-D view gathers faster than the 4-D cache: one row copy per block
    k = k_cache.view(k_cache.shape[0], -1).index_select(0, plan.block_ids).view(num_seqs, ctx_len, num_heads, head_dim)
    v = v_cache.view(v_cache.shape[0], -1).index_select(0, plan.block_ids).view(num_seqs, ctx_len, num_heads, head_dim)
    if k.dtype != q.dtype:  # a narrow cache: gathered narrow (less to copy), then widened
        k, v = (widen_kv(x, None if scales is None else _gather_scales(scales, plan, num_seqs, ctx_len), q.dtype)
                for x, scales in ((k, k_scales), (v, v_scales)))
    # NOTE: rows past a sequence's end hold whatever their block held before (NaN after a failed request).
    # The mask gives them no weight, but NaN + -inf and 0 * NaN are NaN: they are zeroed in the copies.
    k.view(-1, num_heads * head_dim).index_fill_(0, plan.stale_rows, 0.0)
    v.view(-1, num_heads * head_dim).index_fill_(0, plan.stale_rows, 0.0)
    # (B, nh, 1, hd) x (B, nh, L, hd) -> (B, nh, 1, hd); K and V are strided views, which SDPA reads in place
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.mask,
                                       scale=scale)
    return o.squeeze(2)
