"""Block pool: exact block ids, ref counts, prefix-cache reuse and LRU eviction order."""

from __future__ import annotations

import pytest

from lmservice.engine.block_pool import BlockPool, NoFreeBlocksError, hash_block
from lmservice.engine.kv_cache_manager import KVCacheManager
from lmservice.engine.request import Sequence
from lmservice.engine.sampling_params import SamplingParams


def test_allocate_and_free_order():
    pool = BlockPool(4, 2)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    assert pool.num_free_blocks == 1
    pool.free([0, 1])  # freed in reverse: 1 then 0 go to the tail
    assert list(pool.free_queue) == [3, 1, 0]
    assert pool.allocate(3) == [3, 1, 0]
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)


def test_ref_counts_and_double_free():
    pool = BlockPool(2, 2)
    [b] = pool.allocate(1)
    pool.touch([b])
    assert pool.blocks[b].ref_count == 2
    pool.free([b])
    assert b not in pool.free_queue
    pool.free([b])
    assert b in pool.free_queue
    with pytest.raises(AssertionError):
        pool.free([b])


def test_cached_block_reused_then_evicted_lru():
    pool = BlockPool(3, 2)
    a, b = pool.allocate(2)
    ha, hb = hash_block(None, (1, 2), None), hash_block(None, (3, 4), None)
    pool.register(a, ha)
    pool.register(b, hb)
    pool.free([a])
    pool.free([b])
    assert pool.lookup([ha]) == [a]  # free but still cached
    # allocation takes the never-used block 2 first, then a (freed first), evicting its hash
    assert pool.allocate(2) == [2, a]
    assert pool.lookup([ha]) == []
    assert pool.lookup([hb]) == [b]


def _seq(tokens, adapter=None):
    return Sequence("s", "g", 0, list(tokens), SamplingParams(), max_tokens=4, adapter=adapter,
                    adapter_load_id=1 if adapter else None)


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    pool = BlockPool(8, 2)
    kv = KVCacheManager(pool)
    first = _seq([1, 2, 3, 4, 5])
    assert kv.allocate_slots(first, 5)
    assert first.block_ids == [0, 1, 2]
    assert len(pool.cached) == 2  # the two full blocks
    second = _seq([1, 2, 3, 4, 9])
    hits = kv.find_cached_prefix(second)
    assert hits == [0, 1]
    assert kv.allocate_slots(second, 1, hits)
    assert second.block_ids == [0, 1, 3] and second.num_computed_tokens == 4
    assert [pool.blocks[i].ref_count for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    # a prompt that is all cached still computes its last block's token
    third = _seq([1, 2, 3, 4])
    assert kv.find_cached_prefix(third) == [0]
    kv.free(first)
    kv.free(second)
    kv.free(third) if third.block_ids else None
    assert pool.num_used_blocks == 0


def test_prefix_cache_is_keyed_by_adapter():
    pool = BlockPool(8, 2)
    kv = KVCacheManager(pool)
    kv.allocate_slots(_seq([1, 2, 3, 4, 5], adapter="a"), 5)
    assert kv.find_cached_prefix(_seq([1, 2, 3, 4, 5], adapter="b")) == []
    assert kv.find_cached_prefix(_seq([1, 2, 3, 4, 5], adapter="a")) == [0, 1]
    assert kv.find_cached_prefix(_seq([1, 2, 3, 4, 5])) == []


def test_allocation_failure_changes_nothing():
    pool = BlockPool(2, 2)
    kv = KVCacheManager(pool)
    seq = _seq([1, 2, 3, 4, 5])
    assert not kv.allocate_slots(seq, 5)
    assert seq.block_ids == [] and pool.num_free_blocks == 2


def test_prefix_caching_off_shares_only_within_a_request():
    pool = BlockPool(8, 2)
    kv = KVCacheManager(pool, enable_prefix_caching=False)
    first = Sequence("g#0", "g", 0, [1, 2, 3, 4, 5], SamplingParams(), max_tokens=4)
    sibling = Sequence("g#1", "g", 1, [1, 2, 3, 4, 5], SamplingParams(), max_tokens=4)
    other = Sequence("h#0", "h", 0, [1, 2, 3, 4, 5], SamplingParams(), max_tokens=4)
    kv.allocate_slots(first, 5)
    assert kv.find_cached_prefix(sibling) == first.block_ids[:2]
    assert kv.find_cached_prefix(other) == []
