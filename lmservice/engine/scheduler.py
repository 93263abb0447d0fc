"""Iteration-level continuous batching under a token budget (torch-free).

Each step, running sequences go first (a decode costs one token, an unfinished
chunked prefill continues), then waiting sequences are admitted in
(priority, arrival) order with chunks of their prompts while the token budget,
`max_num_seqs` and free KV blocks allow. When blocks run out, the running
sequence that sorts last is preempted: its blocks are freed and it is
recomputed later (its prefix may still be found in the prefix cache). The beams of a
beam search are preempted together (the engine restarts the search), and a beam search
is admitted only with room for all its beams under `max_num_seqs`.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmservice.engine.kv_cache_manager import KVCacheManager
from lmservice.engine.outputs import QueueFullError, RequestRejectedError
from lmservice.engine.request import Sequence, Status


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 128  # sequences running in one step
    max_waiting_requests: int = 1024  # waiting-queue bound, in sequences (429 beyond)
    max_waiting_tokens: int = 1 << 20  # waiting-queue bound, in prompt tokens (429 beyond)
    max_loras: int = 8  # distinct adapters in one step (and resident on the device)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # including the guesses below
    spec_token_ids: list[int] = field(default_factory=list)  # speculative guesses after its pending token

    @property
    def is_decode(self) -> bool:
        """One pending token, and maybe guesses after it (each a decode row of its own for the kernels)."""
        return self.num_new_tokens - len(self.spec_token_ids) == 1


@dataclass
class SchedulerOutput:
    """The only thing the model runner sees. Decodes (one new token) come first."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_decodes: int = 0
    num_batched_tokens: int = 0
    num_spec_tokens: int = 0  # speculative guesses among the batched tokens
    preempted: list[Sequence] = field(default_factory=list)
    # (source, destination) KV blocks to copy before the forward: copy-on-write of forked beams' blocks
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 adapters_fit: Callable[[set[str]], bool] | None = None) -> None:
        self.config = config
        self.kv = kv
        # whether a batch may use these adapters at once (device slots); None: only max_loras counts
        self.adapters_fit = adapters_fit
        self.waiting: list[tuple[tuple[int, int, int], Sequence]] = []  # heap by sort_key
        self.running: list[Sequence] = []
        self.num_waiting_tokens = 0
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def check_fits(self, num_seqs: int, num_tokens: int) -> None:
        """RequestRejectedError when a request is larger than the waiting queue's bounds on its own: no wait
        would ever admit it, so it is the request's fault (400), not the queue's (429)."""
        c = self.config
        if num_seqs > c.max_waiting_requests:
            raise RequestRejectedError(f"the request has {num_seqs} sequences (n x prompts); the waiting queue "
                                       f"holds at most {c.max_waiting_requests} (--max-waiting-requests)", "n")
        if num_tokens > c.max_waiting_tokens:
            raise RequestRejectedError(f"the request has {num_tokens} prompt tokens (over all its sequences); the "
                                       f"waiting queue holds at most {c.max_waiting_tokens} (--max-waiting-tokens)",
                                       "prompt")

    def check_admission(self, num_seqs: int, num_tokens: int) -> None:
        """Raise QueueFullError when the bounded waiting queue cannot take this request."""
        if len(self.waiting) + num_seqs > self.config.max_waiting_requests:
            raise QueueFullError(f"waiting queue is full ({len(self.waiting)} requests waiting)")
        if self.num_waiting_tokens + num_tokens > self.config.max_waiting_tokens:
            raise QueueFullError(f"waiting queue is full ({self.num_waiting_tokens} prompt tokens waiting)")

    def add(self, seq: Sequence) -> None:
        self._push_waiting(seq)

    def _push_waiting(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        heapq.heappush(self.waiting, (seq.sort_key, seq))
        self.num_waiting_tokens += seq.num_tokens

    def _pop_waiting(self) -> Sequence:
        _, seq = heapq.heappop(self.waiting)
        self.num_waiting_tokens -= seq.num_tokens
        return seq

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        now = time.monotonic()
        self.running.sort(key=lambda s: s.sort_key)

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new == 0:  # a beam whose candidates are in, waiting for its siblings' (engine.BeamSearch)
                i += 1
                continue
            while not self.kv.allocate_slots(seq, num_new):
                victim = max(self.running, key=lambda s: s.sort_key)
                budget += self._preempt_whole(victim, out)
                if seq.status is Status.WAITING:
                    break
            if seq.status is Status.WAITING:  # preempted itself: nothing behind it can run either
                break
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1

        adapters = {s.seq.adapter for s in out.scheduled if s.seq.adapter is not None}
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            seq = self.waiting[0][1]
            if len(self.running) + seq.params.num_beams > self.config.max_num_seqs:
                break
            if seq.adapter is not None and seq.adapter not in adapters and (
                    len(adapters) >= self.config.max_loras
                    or (self.adapters_fit is not None and not self.adapters_fit(adapters | {seq.adapter}))):
                deferred.append(self._pop_waiting())  # a batch holds at most max_loras distinct adapters
                continue
            first_time = seq.num_computed_tokens == 0 and seq.first_scheduled_time is None
            cached = self.kv.find_cached_prefix(seq)
            num_computed = seq.num_computed_tokens + len(cached) * self.kv.block_size
            num_new = min(seq.num_tokens - num_computed, budget)
            if not self.kv.allocate_slots(seq, num_new, cached):
                break
            self._pop_waiting()
            if first_time:
                self.kv.record_lookup(seq, len(cached))
                seq.num_cached_tokens = len(cached) * self.kv.block_size
                seq.first_scheduled_time = now
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.adapter is not None:
                adapters.add(seq.adapter)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        for seq in deferred:
            self._push_waiting(seq)
        budget = self._add_guesses(out, budget)

        # Decodes first, speculating ones too (the runner gives them the decode kernel); rows of one adapter next
        # to each other, so that the LoRA kernels see contiguous groups.
        out.scheduled.sort(key=lambda s: (not s.is_decode, s.seq.adapter or ""))
        out.num_decodes = sum(1 for s in out.scheduled if s.is_decode)
        out.num_spec_tokens = sum(len(s.spec_token_ids) for s in out.scheduled)
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        out.block_copies = self.kv.take_block_copies()
        return out

    def _preempt_whole(self, victim: Sequence, out: SchedulerOutput) -> int:
        """Preempt victim, and with it the other running beams of a beam search (they are one unit: it
        restarts). Beams already scheduled in this step leave the batch; returns the budget they give back."""
        if victim.params.num_beams > 1:
            victims = [s for s in self.running if s.group_id == victim.group_id]
        else:
            victims = [victim]
        for seq in victims:
            self._preempt(seq)
            out.preempted.append(seq)
        dropped = [item for item in out.scheduled if item.seq.status is Status.WAITING]
        if dropped:
            out.scheduled = [item for item in out.scheduled if item.seq.status is not Status.WAITING]
        return sum(item.num_new_tokens for item in dropped)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run child, a fork of running parent (a beam), from now on: it shares parent's KV blocks."""
        self.kv.fork(parent, child)
        child.status = Status.RUNNING
        self.running.append(child)

    def _add_guesses(self, out: SchedulerOutput, budget: int) -> int:
        """Speculative guesses ride on what is left once every running sequence has its own token and the
        waiting ones are admitted: the budget left over, and blocks the pool can spare (their slots get no
        prefix-cache hashes: guesses are not the sequence's tokens until verified). They never preempt
        anyone; a sequence they do not fit decodes its one token as usual. Returns the budget left."""
        for item in out.scheduled:
            seq = item.seq
            guesses = seq.spec_token_ids[:budget] if item.num_new_tokens == 1 else []
            seq.spec_token_ids = []
            if guesses and self.kv.allocate_slots(seq, 1, num_lookahead=len(guesses)):
                item.num_new_tokens += len(guesses)
                item.spec_token_ids = guesses
                budget -= len(guesses)
        return budget

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Retire a sequence (done, aborted or failed) and free its blocks at once. A failed one
        ("error") first withdraws its blocks from the prefix cache: the failed step may have left
        them unwritten or holding non-finite values."""
        if seq.status is Status.FINISHED:
            return
        if reason == "error":
            self.kv.forget(seq)
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting = [(k, s) for k, s in self.waiting if s is not seq]
            heapq.heapify(self.waiting)
            self.num_waiting_tokens -= seq.num_tokens
        self.kv.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
