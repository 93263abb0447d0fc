"""Triton KV-cache write vs write_kv_cache_torch, on NaN-poisoned caches."""

from __future__ import annotations

import pytest
import torch

from lmservice.kernels.kv_cache import write_kv_cache_torch
from lmservice.kernels.triton_kv_cache import write_kv_cache_triton
from tests.kernels.paged_batch import qkv_views


@pytest.mark.parametrize(("block_size", "num_heads", "dtype"),
                         [(16, 12, torch.float32), (16, 25, torch.float16), (32, 25, torch.float32), (32, 12, torch.float16)])
def test_write_matches_reference_and_skips_padding(block_size, num_heads, dtype, gen):
    num_blocks, num_tokens = 5, 2 * block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 7, num_tokens - 1]] = -1  # padding rows, first and last included
    _, key, value = qkv_views(num_tokens, num_heads, 64, dtype, gen)  # strided, like the model's
    caches = [torch.full((num_blocks, block_size, num_heads, 64), float("nan"), dtype=dtype) for _ in range(4)]
    write_kv_cache_triton(key, value, caches[0], caches[1], slots)
    write_kv_cache_torch(key, value, caches[2], caches[3], slots)
    # untouched slots stay NaN in both; written ones are exact copies
    torch.testing.assert_close(caches[0], caches[2], atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(caches[1], caches[3], atol=0, rtol=0, equal_nan=True)
    written = caches[0].view(-1, num_heads, 64)[slots[slots >= 0]]
    assert not written.isnan().any()


def test_write_casts_to_the_cache_dtype(gen):
    _, key, value = qkv_views(4, 2, 64, torch.float32, gen)
    k_cache, v_cache = (torch.full((2, 16, 2, 64), float("nan"), dtype=torch.float16) for _ in range(2))
    slots = torch.tensor([3, -1, 17, 30], dtype=torch.int32)
    write_kv_cache_triton(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache.view(-1, 2, 64)[[3, 17, 30]], key[[0, 2, 3]].half(), atol=0, rtol=0)
    torch.testing.assert_close(v_cache.view(-1, 2, 64)[[3, 17, 30]], value[[0, 2, 3]].half(), atol=0, rtol=0)
