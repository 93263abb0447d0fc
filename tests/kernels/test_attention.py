"""The torch attention path (the CPU engine's) against a per-sequence loop written for clarity."""

from __future__ import annotations

import pytest
import torch

from lmservice.kernels.attention import decode_attention_torch, plan_decode_torch
from tests.kernels.paged_batch import make_paged_batch

SCALE = 0.125


def decode_by_loop(q, k_cache, v_cache, seq_lens, block_tables):
    """Each sequence's context token by token, then softmax(q k^T) v: slow and obviously right."""
    block_size = k_cache.shape[1]
    out = []
    for s, seq_len in enumerate(seq_lens.tolist()):
        rows = [(int(block_tables[s, t // block_size]), t % block_size) for t in range(seq_len)]
        k = torch.stack([k_cache[b, r] for b, r in rows])  # (L, nh, hd)
        v = torch.stack([v_cache[b, r] for b, r in rows])
        weights = torch.einsum("hd,lhd->hl", q[s].double(), k.double()).mul(SCALE).softmax(-1)
        out.append(torch.einsum("hl,lhd->hd", weights, v.double()))
    return torch.stack(out).to(q.dtype)


@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_decode_matches_loop_on_poisoned_cache(block_size, gen):
    """Every slot outside the written contexts is NaN, tables are padded with -1 and sequences end
    mid-block, at a block's end and one past it: no NaN may reach an output."""
    seq_lens = [1, block_size, block_size + 1, 3 * block_size + 5, 2]
    b = make_paged_batch(seq_lens, [1] * len(seq_lens), block_size, 3, torch.float32, gen)
    out = decode_attention_torch(b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables, SCALE)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, decode_by_loop(b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables),
                               atol=1e-5, rtol=1e-5)


def test_decode_plan_is_shared_by_layers(gen):
    """One plan built per step serves every layer's cache (the engine passes it to each layer)."""
    b = make_paged_batch([7, 40, 17], [1, 1, 1], 16, 2, torch.float32, gen)
    plan = plan_decode_torch(b.seq_lens, b.block_tables, 16)
    assert plan.mask.shape == (3, 1, 1, 48) and plan.block_ids.shape == (9,)
    assert plan.stale_rows.numel() == 3 * 48 - (7 + 40 + 17)
    other_k, other_v = torch.randn_like(b.k_cache), torch.randn_like(b.v_cache)  # a second layer's cache
    for k_cache, v_cache in ((b.k_cache, b.v_cache), (other_k, other_v)):
        with_plan = decode_attention_torch(b.q, k_cache, v_cache, b.seq_lens, b.block_tables, SCALE, plan)
        torch.testing.assert_close(with_plan, decode_by_loop(b.q, k_cache, v_cache, b.seq_lens, b.block_tables),
                                   atol=1e-5, rtol=1e-5)


def test_decode_leaves_the_cache_alone(gen):
    """Stale rows are zeroed in the gathered copy, never in the cache itself."""
    b = make_paged_batch([5, 20], [1, 1], 16, 2, torch.float32, gen)
    k_before, v_before = b.k_cache.clone(), b.v_cache.clone()
    decode_attention_torch(b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables, SCALE)
    assert torch.equal(b.k_cache.isnan(), k_before.isnan()) and torch.equal(b.v_cache.isnan(), v_before.isnan())
    assert torch.equal(b.k_cache.nan_to_num(), k_before.nan_to_num())
