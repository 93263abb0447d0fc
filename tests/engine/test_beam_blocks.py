"""Beam search's bookkeeping, torch-free: a fork shares its parent's blocks by reference count, the partly
filled block is copied on write (exact block ids), a beam search is preempted whole, admitted with room for
all its beams, and its beams wait for each other."""

from __future__ import annotations

from lmservice.engine.beam import BeamSearch, beam_params
from lmservice.engine.block_pool import BlockPool
from lmservice.engine.kv_cache_manager import KVCacheManager
from lmservice.engine.request import Sequence, Status
from lmservice.engine.sampling_params import SamplingParams
from lmservice.engine.scheduler import Scheduler, SchedulerConfig


def make(num_blocks=16, block_size=4, **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(BlockPool(num_blocks, block_size)))


def beam_root(name: str, n_prompt: int, num_beams: int = 2, max_tokens: int = 8) -> Sequence:
    start = 100 * (1 + ord(name[0]))
    params = beam_params(SamplingParams(temperature=0.0, num_beams=num_beams))
    return Sequence(name, name, 0, list(range(start, start + n_prompt)), params, max_tokens=max_tokens)


def complete(out, token=7):
    """What the engine's update does for ordinary sequences: advance, append a token when caught up."""
    for item in out.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
        if item.seq.num_computed_tokens == item.seq.num_tokens:
            item.seq.output_token_ids.append(token)


def refs(s: Scheduler) -> list[int]:
    return [b.ref_count for b in s.kv.pool.blocks]


def fork(s: Scheduler, parent: Sequence, fork_order: int = 1) -> Sequence:
    """A child of parent (its prompt computed) in the scheduler, as BeamSearch makes one."""
    child = Sequence(f"{parent.seq_id}#{fork_order}", parent.group_id, 0, list(parent.prompt_token_ids),
                     parent.params, max_tokens=8, fork_order=fork_order)
    s.fork(parent, child)
    return child


def prefilled_pair(s: Scheduler, n_prompt: int) -> tuple[Sequence, Sequence]:
    """A beam search's root with its prompt computed, forked once; each has taken a different next token."""
    root = beam_root("a", n_prompt)
    s.add(root)
    s.schedule()
    root.num_computed_tokens = n_prompt
    child = fork(s, root)
    root.output_token_ids.append(5)
    child.output_token_ids.append(6)
    return root, child


def test_fork_shares_blocks_and_copies_the_partial_block_on_write():
    s = make(num_blocks=8)
    root = beam_root("a", 6)  # one full block, one with 2 of 4 slots
    s.add(root)
    out = s.schedule()
    assert root.block_ids == [0, 1] and not out.block_copies
    root.num_computed_tokens = 6
    child = fork(s, root)
    assert child.block_ids == [0, 1] and child.status is Status.RUNNING and child.num_computed_tokens == 6
    assert refs(s)[:2] == [2, 2] and s.kv.pool.num_used_blocks == 2
    root.output_token_ids.append(5)
    child.output_token_ids.append(6)
    out = s.schedule()
    # the first writer into the shared partial block gets a copy (block 2); the other keeps block 1 alone
    assert out.block_copies == [(1, 2)]
    assert root.block_ids == [0, 2] and child.block_ids == [0, 1]
    assert refs(s)[:3] == [2, 1, 1]
    complete(out)
    out = s.schedule()
    assert not out.block_copies  # nothing is shared but the full block now
    for seq in (root, child):
        s.finish(seq, "stop")
    assert not any(refs(s)) and s.kv.pool.num_free_blocks == 8


def test_fork_at_a_block_boundary_copies_nothing():
    s = make(num_blocks=8)
    root, child = prefilled_pair(s, 8)  # two full blocks
    out = s.schedule()
    assert not out.block_copies
    assert root.block_ids[:2] == child.block_ids[:2] and root.block_ids[2] != child.block_ids[2]
    assert refs(s)[:2] == [2, 2]


def test_copy_on_write_waits_for_a_free_block():
    """With no block for the copy, the writer preempts as any sequence short of blocks does (here: the
    whole beam search, its own)."""
    s = make(num_blocks=2)
    prefilled_pair(s, 6)
    out = s.schedule()
    assert not out.scheduled and not out.block_copies
    assert {seq.seq_id for seq in out.preempted} == {"a", "a#1"}
    assert not any(refs(s))


def test_beam_search_is_preempted_whole_and_leaves_the_batch():
    s = make(num_blocks=4, block_size=4)
    older = Sequence("o", "o", 0, list(range(500, 508)), SamplingParams(), max_tokens=8)  # 2 full blocks
    s.add(older)
    root = beam_root("a", 6)  # 2 blocks
    s.add(root)
    complete(s.schedule())
    root.output_token_ids.pop()  # a beam takes its token from BeamSearch.advance
    child = fork(s, root)
    root.output_token_ids.append(5)
    child.output_token_ids.append(6)
    out = s.schedule()  # older needs a third block: only the beam search can give blocks back
    assert [item.seq.seq_id for item in out.scheduled] == ["o"]
    assert {seq.seq_id for seq in out.preempted} == {"a", "a#1"}
    assert root.status is child.status is Status.WAITING and not root.block_ids and not child.block_ids
    assert sorted(refs(s)) == [0, 1, 1, 1]


def test_beams_wait_for_their_siblings():
    """A beam whose candidates are in (nothing left to compute) is skipped until the search advances."""
    s = make(num_blocks=8, max_num_batched_tokens=1)
    root = beam_root("a", 4)
    s.add(root)
    root.num_computed_tokens = 0
    s.kv.pool.num_queries = 0
    out = s.schedule()  # one token of the prompt
    complete(out)
    out = s.schedule()
    complete(out)
    out = s.schedule()
    complete(out)
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == 1
    out.scheduled[0].seq.num_computed_tokens += 1  # caught up; no token appended
    out = s.schedule()
    assert out.is_empty


def test_a_beam_search_is_admitted_with_room_for_all_its_beams():
    s = make(num_blocks=16, max_num_seqs=4)
    s.add(Sequence("o", "o", 0, [1, 2], SamplingParams(), max_tokens=8))
    s.add(beam_root("a", 3, num_beams=4))
    out = s.schedule()
    assert [item.seq.seq_id for item in out.scheduled] == ["o"]
    s.finish(out.scheduled[0].seq, "stop")
    assert [item.seq.seq_id for item in s.schedule().scheduled] == ["a"]


class _Recorder:
    """What BeamSearch asks of the scheduler, recorded."""

    def __init__(self) -> None:
        self.forks: list[tuple[str, str]] = []
        self.finished: list[str] = []
        self.added: list[str] = []

    def fork(self, parent, child):
        self.forks.append((parent.seq_id, child.seq_id))
        child.status = Status.RUNNING

    def finish(self, seq, reason):
        self.finished.append(seq.seq_id)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def add(self, seq):
        self.added.append(seq.seq_id)


def test_advance_picks_forks_and_retires():
    root = beam_root("a", 3, num_beams=2)
    root.status = Status.RUNNING
    search = BeamSearch(root, eos_token_id=99)
    sched = _Recorder()
    search.report(root, [(10, -0.1), (11, -0.2), (99, -0.3), (12, -2.0)])
    assert search.is_ready
    search.advance(sched, now=1.0)
    a, b = search.seqs
    assert (a.seq_id, a.output_token_ids, b.output_token_ids) == ("a", [10], [11])
    assert sched.forks == [("a", b.seq_id)] and b.fork_order == 1 and not sched.finished
    # both continue from beam a: b is retired, a forks once more; EOS ranked among the first k is kept
    search.report(a, [(20, -0.1), (99, -0.15), (21, -0.3), (22, -0.4)])
    assert not search.is_ready
    search.report(b, [(30, -5.0), (31, -6.0), (32, -7.0), (33, -8.0)])
    search.advance(sched, now=2.0)
    assert [s.output_token_ids for s in search.seqs] == [[10, 20], [10, 21]]
    assert sched.finished == [b.seq_id]
    assert [(round(h.score, 4), h.token_ids, h.finish_reason) for h in search.hypotheses] == [
        (round(-0.25 / 2, 4), [10, 99], "stop")]


def test_restart_queues_the_prompt_again():
    root = beam_root("a", 3, num_beams=2)
    root.first_scheduled_time = 5.0
    search = BeamSearch(root, eos_token_id=99)
    sched = _Recorder()
    search.report(root, [(10, -0.1), (11, -0.2), (12, -0.3), (13, -0.4)])
    search.advance(sched, now=1.0)
    search.restart(sched)
    (new,) = search.seqs
    assert sched.finished == ["a", search.seqs[0].seq_id] or set(sched.finished) >= {"a"}
    assert new.output_token_ids == [] and new.status is Status.WAITING and new.first_scheduled_time == 5.0
    assert sched.added == [new.seq_id] and new.fork_order > 1 and not search.hypotheses


def test_beams_already_in_the_batch_leave_it_with_their_search():
    s = make(num_blocks=3)
    root = beam_root("a", 6, num_beams=3)
    s.add(root)
    s.schedule()
    root.num_computed_tokens = 6
    for i in (1, 2):
        fork(s, root, i).output_token_ids.append(5 + i)
    root.output_token_ids.append(5)
    out = s.schedule()  # root copies the shared block into the last free one; a#1 finds none
    assert out.is_empty and out.num_batched_tokens == 0
    assert {seq.seq_id for seq in out.preempted} == {"a", "a#1", "a#2"}
    assert not any(refs(s))
