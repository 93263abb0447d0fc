"""Paged attention over the KV cache: varlen prefill (and chunked prefill) and decode.

Cache layout, per layer (NOTE: shared by every kernel and the engine):
    k_cache, v_cache: (num_blocks, block_size, num_heads, head_dim)
    token t of a sequence lives in block block_table[t // block_size], row t % block_size.

The torch functions here are both the reference the Triton kernels are tested
against and the CPU path of the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """K or V of one sequence, contiguous: (seq_len, num_heads, head_dim)."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())  # (nb, bs, nh, hd)
    return blocks.flatten(0, 1)[:seq_len]


def prefill_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
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
        k = _gather_context(k_cache, block_tables[s], seq_len).transpose(0, 1)  # (nh, L, hd)
        v = _gather_context(v_cache, block_tables[s], seq_len).transpose(0, 1)  # (nh, L, hd)
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


def decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence against its paged context.

    q: (num_seqs, num_heads, head_dim); seq_lens: (num_seqs,) context lengths
    including the query token (whose K/V is already in the cache). Returns
    (num_seqs, num_heads, head_dim).
    """
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, block_size = k_cache.shape[:2]
    max_len = int(seq_lens.max())
    seq_lens = seq_lens.to(q.device)
    pos = torch.arange(max_len, device=q.device)[None, :]  # (1, L)
    mask = pos < seq_lens[:, None]  # (B, L)
    # NOTE: positions past a sequence's end read its position 0 instead: that row was
    # written, so it is finite (stale or NaN-poisoned slots are never read), and the
    # mask gives it zero weight.
    pos = torch.where(mask, pos, 0)
    slots = block_tables.long().gather(1, pos // block_size) * block_size + pos % block_size  # (B, L)
    k = k_cache.view(num_blocks * block_size, num_heads, head_dim)[slots]  # (B, L, nh, hd)
    v = v_cache.view(num_blocks * block_size, num_heads, head_dim)[slots]  # (B, L, nh, hd)
    # (B, nh, 1, hd) x (B, nh, L, hd) -> (B, nh, 1, hd)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :], scale=scale
    )
    return o.squeeze(2)
