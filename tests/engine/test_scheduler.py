"""Scheduler: token budget, decodes first, chunked prefill, priority, preemption, abort, bounded queue."""

from __future__ import annotations

import pytest

from lmservice.engine.block_pool import BlockPool
from lmservice.engine.kv_cache_manager import KVCacheManager
from lmservice.engine.outputs import QueueFullError, RequestRejectedError
from lmservice.engine.request import Sequence, Status
from lmservice.engine.sampling_params import SamplingParams
from lmservice.engine.scheduler import Scheduler, SchedulerConfig


def make(num_blocks=16, block_size=4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(BlockPool(num_blocks, block_size)))


def seq(name, n_prompt, priority=0, adapter=None) -> Sequence:
    start = 100 * (1 + ord(name[0]))  # distinct prompts: no prefix-cache sharing between tests' sequences
    return Sequence(name, name, 0, list(range(start, start + n_prompt)), SamplingParams(), max_tokens=8,
                    priority=priority, adapter=adapter)


def complete(sched, out, token=7):
    """What the engine's update does: advance, and append a token when caught up."""
    for item in out.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        if item.seq.num_computed_tokens == item.seq.num_tokens:
            item.seq.output_token_ids.append(token)


def test_chunked_prefill_under_budget_then_decodes_first():
    s = make(max_num_batched_tokens=6)
    a, b = seq("a", 10), seq("b", 3)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [(x.seq.seq_id, x.num_new_tokens) for x in out.scheduled] == [("a", 6)]
    complete(s, out)
    out = s.schedule()  # a continues (4 tokens), b gets the 2 left
    assert sorted((x.seq.seq_id, x.num_new_tokens) for x in out.scheduled) == [("a", 4), ("b", 2)]
    complete(s, out)
    out = s.schedule()  # a decodes (1 token) and comes first; b finishes its prompt
    assert [(x.seq.seq_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 1)]
    assert out.num_decodes == 2 and out.num_batched_tokens == 2


def test_max_num_seqs():
    s = make(max_num_seqs=2)
    for name in "abc":
        s.add(seq(name, 2))
    out = s.schedule()
    assert [x.seq.seq_id for x in out.scheduled] == ["a", "b"]
    assert s.num_waiting == 1


def test_priority_orders_admission():
    s = make(max_num_seqs=1)
    s.add(seq("late-low", 2, priority=5))
    s.add(seq("urgent", 2, priority=-1))
    assert [x.seq.seq_id for x in s.schedule().scheduled] == ["urgent"]


def test_preemption_frees_lowest_priority_and_recomputes():
    s = make(num_blocks=4, block_size=2)
    a, b = seq("a", 4), seq("b", 3, priority=1)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [x.seq.seq_id for x in out.scheduled] == ["a", "b"]
    assert a.block_ids == [0, 1] and b.block_ids == [2, 3]
    complete(s, out)
    out = s.schedule()  # a needs a 3rd block for its decode: b (lower priority) is preempted
    assert [x.seq.seq_id for x in out.scheduled] == ["a"]
    assert out.preempted == [b] and b.status is Status.WAITING and b.num_computed_tokens == 0
    assert b.block_ids == [] and s.num_preemptions == 1
    assert b.output_token_ids == [7]  # kept: recomputed from prompt + outputs later


def test_abort_frees_blocks_at_once():
    s = make()
    a = seq("a", 9)
    s.add(a)
    s.schedule()
    assert a.block_ids
    s.finish(a, "abort")
    assert s.kv.pool.num_used_blocks == 0 and not s.running
    w = seq("w", 3)
    s.add(w)
    s.finish(w, "abort")
    assert s.num_waiting == 0 and s.num_waiting_tokens == 0


def test_bounded_waiting_queue():
    s = make(max_waiting_requests=2, max_waiting_tokens=100)
    s.check_admission(1, 10)
    s.add(seq("a", 10))
    s.add(seq("b", 10))
    with pytest.raises(QueueFullError):
        s.check_admission(1, 10)
    s2 = make(max_waiting_tokens=15)
    s2.add(seq("a", 10))
    with pytest.raises(QueueFullError):
        s2.check_admission(1, 10)
    # larger than the bounds on its own: refused for good, naming the flag (busy or not)
    s2.check_fits(1, 15)
    with pytest.raises(RequestRejectedError, match="--max-waiting-tokens"):
        s2.check_fits(1, 16)
    with pytest.raises(RequestRejectedError, match="--max-waiting-requests"):
        s.check_fits(3, 10)


def test_batch_holds_at_most_max_loras_adapters():
    s = make(max_loras=2)
    for name, adapter in [("a", "x"), ("b", "y"), ("c", "z"), ("d", "x"), ("e", None)]:
        s.add(seq(name, 2, adapter=adapter))
    out = s.schedule()
    # c (a third adapter) waits; the batch is ordered by adapter: base, x, x, y
    assert [x.seq.seq_id for x in out.scheduled] == ["e", "a", "d", "b"]
    assert [w.seq_id for _, w in s.waiting] == ["c"]
