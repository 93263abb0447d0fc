"""Triton paged attention vs the torch reference (lmservice/kernels/attention.py), under the interpreter."""

from __future__ import annotations

import pytest
import torch

from lmservice.kernels.attention import decode_attention_torch, prefill_attention_torch
from lmservice.kernels.triton_attention import (
    MAX_SPLITS,
    choose_num_splits,
    decode_attention_triton,
    prefill_attention_triton,
)
from tests.kernels.paged_batch import make_paged_batch, tolerance

SCALE = 0.125
# (block_size, num_heads, dtype): each block size, head count and dtype at least twice
CASES = [(16, 12, torch.float32), (16, 25, torch.float16), (32, 12, torch.float16), (32, 25, torch.float32)]
IDS = [f"bs{b}-h{h}-{str(d)[6:]}" for b, h, d in CASES]


def _prefill_lens(bs: int) -> tuple[list[int], list[int]]:
    """Whole prompts of length 1, bs-1, bs+1; chunks after cached prefixes; a lone last token."""
    seq_lens = [1, bs - 1, bs + 1, bs + 1, 2 * bs + 3, bs + 9]
    q_lens = [1, bs - 1, bs + 1, 3, 1, bs - 2]
    return seq_lens, q_lens


@pytest.mark.parametrize(("block_size", "num_heads", "dtype"), CASES, ids=IDS)
def test_prefill_matches_reference(block_size, num_heads, dtype, gen):
    seq_lens, q_lens = _prefill_lens(block_size)
    b = make_paged_batch(seq_lens, q_lens, block_size, num_heads, dtype, gen)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables, SCALE)
    out = prefill_attention_triton(*args)
    torch.testing.assert_close(out, prefill_attention_torch(*args), **tolerance(dtype))


def test_prefill_many_short_sequences(gen):
    seq_lens = [3, 1, 17, 9, 33, 2, 16, 5, 31, 12]
    q_lens = [3, 1, 2, 9, 1, 2, 16, 4, 31, 1]
    b = make_paged_batch(seq_lens, q_lens, 16, 2, torch.float32, gen)
    args = (b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables, SCALE)
    torch.testing.assert_close(prefill_attention_triton(*args), prefill_attention_torch(*args), **tolerance(torch.float32))


@pytest.mark.parametrize(("block_size", "num_heads", "dtype"), CASES, ids=IDS)
def test_decode_matches_reference(block_size, num_heads, dtype, gen):
    seq_lens = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5]
    b = make_paged_batch(seq_lens, [1] * len(seq_lens), block_size, num_heads, dtype, gen)
    args = (b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables, SCALE)
    torch.testing.assert_close(decode_attention_triton(*args), decode_attention_torch(*args), **tolerance(dtype))


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_decode_same_result_whatever_the_split(num_splits, gen):
    """Partitions merged by log-sum-exp: splits that are empty for short sequences included."""
    seq_lens = [1, 15, 17, 70, 129]
    b = make_paged_batch(seq_lens, [1] * len(seq_lens), 16, 3, torch.float32, gen)
    args = (b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables, SCALE)
    out = decode_attention_triton(*args, num_splits=num_splits)
    torch.testing.assert_close(out, decode_attention_torch(*args), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_padding_row_gives_zeros(num_splits, gen):
    """A CUDA graph's unused batch slots run with seq_len 0: finite zeros, not NaN, and no reads."""
    b = make_paged_batch([5, 20], [1, 1], 16, 2, torch.float32, gen)
    seq_lens = b.seq_lens.clone()
    seq_lens[1] = 0
    out = decode_attention_triton(b.q, b.k_cache, b.v_cache, seq_lens, b.block_tables, SCALE, num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = decode_attention_torch(b.q[:1], b.k_cache, b.v_cache, seq_lens[:1], b.block_tables[:1], SCALE)
    torch.testing.assert_close(out[:1], ref, **tolerance(torch.float32))


def test_choose_num_splits_fills_the_device_without_tiny_partitions():
    assert choose_num_splits(256, 12, 1024, num_sms=132) == 1  # batch x heads already fills the GPU
    assert choose_num_splits(1, 12, 1024, num_sms=132) == 1024 // 128  # capped by partition length
    assert choose_num_splits(1, 12, 64, num_sms=132) == 1  # too short to split
    assert choose_num_splits(1, 1, 1 << 20, num_sms=132) == MAX_SPLITS
    by_batch = [choose_num_splits(n, 12, 1024, num_sms=132) for n in (1, 2, 8, 32, 64, 256)]
    assert by_batch == sorted(by_batch, reverse=True) and by_batch[0] > by_batch[-1]


def test_rejects_mismatched_cache():
    b = make_paged_batch([5], [1], 16, 2, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="caches"):  # not a KV-cache format
        decode_attention_triton(b.q, b.k_cache.double(), b.v_cache.double(), b.seq_lens, b.block_tables, SCALE)
    with pytest.raises(AssertionError, match="needs its scales"):
        decode_attention_triton(b.q, b.k_cache.to(torch.int8), b.v_cache.to(torch.int8), b.seq_lens, b.block_tables,
                                SCALE)
    with pytest.raises(AssertionError, match="does not match"):
        decode_attention_triton(b.q[:, :1], b.k_cache, b.v_cache, b.seq_lens, b.block_tables, SCALE)
