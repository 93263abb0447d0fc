"""Beam search over the engine's ordinary sequences (torch-free).

The beams of a request are Sequences scheduled like any other: each step every live beam decodes one
token, in the same batch as other requests' rows. A beam's params ask the sampler for the 2k best
log-probabilities of its next token (its logprobs path: log_softmax of the raw float32 logits, nothing
reshaping them), and when all k live beams have reported, `BeamSearch.advance` picks the next beams. A beam
picked once continues in place; picked again, it forks: the child shares its parent's KV blocks through the
pool's reference counts, and the partly filled last block is copied when one of them next writes into it
(KVCacheManager). A beam not picked is retired and its blocks go back to the pool.

The choice is transformers' beam search (`generate(num_beams=k, do_sample=False, length_penalty,
early_stopping)`, the version tests/engine/test_beam_search.py runs as the reference):
- the candidates are the 2k best (beam score + logprob of a next token) over all beams, a beam's score being
  the sum of its generated tokens' logprobs;
- a candidate that ends in EOS, or reaches max_tokens (then every candidate does), is finished; of those,
  only the ones ranked among the first k become hypotheses, scored sum / length**length_penalty where length
  counts the generated tokens, EOS included; the k best hypotheses are kept;
- the next beams are the k best unfinished candidates;
- the search ends at max_tokens, or once k hypotheses are kept and: early_stopping is True; or False and the
  best beam's score / length**length_penalty cannot beat the worst kept hypothesis; or "never" and the same
  holds with max_tokens as the length (when length_penalty > 0; else the current length).
The n best hypotheses are the result, reported only when the search ends.

Preemption: the beams of one search are preempted together (Scheduler._preempt_whole), and the search
restarts from its prompt (`restart`): beam search is deterministic, so the result is the same.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from lmservice.engine.outputs import CompletionDelta
from lmservice.engine.request import Sequence, Status
from lmservice.engine.sampling_params import SamplingParams
from lmservice.engine.scheduler import Scheduler


def beam_params(params: SamplingParams) -> SamplingParams:
    """A beam's own params: greedy, with the 2k best next-token logprobs reported."""
    return dataclasses.replace(params, logprobs=2 * params.num_beams)


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens and its length-penalised score."""

    score: float
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class _Beam:
    seq: Sequence
    score: float  # sum of the logprobs of its generated tokens


class BeamSearch:
    """The live beams and the kept hypotheses of one request.

    Invariant: every live beam's sequence is running or waiting in the scheduler and holds
    the same number of generated tokens; a finished search holds no running sequence.
    """

    def __init__(self, root: Sequence, eos_token_id: int | None) -> None:
        params = root.params
        self.num_beams = params.num_beams
        self.num_return = params.n
        self.length_penalty = params.length_penalty
        self.early_stopping = params.early_stopping
        self.eos_token_id = None if params.ignore_eos else eos_token_id
        self.max_tokens = root.max_tokens
        self._prompt = self._copy(root)  # what a restart queues again
        self.beams = [_Beam(root, 0.0)]
        self.hypotheses: list[Hypothesis] = []  # best first, at most num_beams
        self.is_done = False
        self._candidates: dict[str, list[tuple[int, float]]] = {}  # seq_id -> its (token id, logprob), best first
        self._num_forks = 0

    @property
    def seqs(self) -> list[Sequence]:
        return [b.seq for b in self.beams]

    # --- a step ---
    def report(self, seq: Sequence, top: list[tuple[int, float]]) -> None:
        """A beam's best next tokens, (token id, logprob), best first."""
        self._candidates[seq.seq_id] = top

    @property
    def is_ready(self) -> bool:
        """Whether every live beam has reported this step (a beam the token budget left out reports next step)."""
        return not self.is_done and all(b.seq.seq_id in self._candidates for b in self.beams)

    def advance(self, scheduler: Scheduler, now: float) -> None:
        """Pick the next beams from the reported candidates, or end the search; fork and retire sequences."""
        k = self.num_beams
        ranked = sorted(((b.score + logprob, j, token) for j, b in enumerate(self.beams)
                         for token, logprob in self._candidates[b.seq.seq_id]), key=lambda c: -c[0])[:2 * k]
        self._candidates.clear()
        length = self.beams[0].seq.num_output_tokens + 1  # of every candidate
        at_limit = length >= self.max_tokens
        running = []
        for rank, (score, j, token) in enumerate(ranked):
            if token == self.eos_token_id or at_limit:
                if rank < k:
                    self._keep(Hypothesis(score / length ** self.length_penalty,
                                          self.beams[j].seq.output_token_ids + [token],
                                          "stop" if token == self.eos_token_id else "length"))
            elif len(running) < k:
                running.append((score, j, token))
        if at_limit or not running or self._cannot_improve(running[0][0], length):
            self._finish(scheduler)
            return
        # forks first: a child copies its parent's tokens before the parent takes its own next one
        picked: set[int] = set()
        plan = []
        for score, j, token in running:
            parent = self.beams[j].seq
            plan.append((self._fork(parent, scheduler) if j in picked else parent, token, score))
            picked.add(j)
        for j, beam in enumerate(self.beams):
            if j not in picked:
                scheduler.finish(beam.seq, "stop")
        for seq, token, _ in plan:
            seq.output_token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
        self.beams = [_Beam(seq, score) for seq, _, score in plan]

    def _keep(self, hyp: Hypothesis) -> None:
        self.hypotheses.append(hyp)
        self.hypotheses.sort(key=lambda h: -h.score)
        del self.hypotheses[self.num_beams:]

    def _cannot_improve(self, best_running_score: float, length: int) -> bool:
        if len(self.hypotheses) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0:
            length = self.max_tokens
        return best_running_score / length ** self.length_penalty <= self.hypotheses[-1].score

    def _finish(self, scheduler: Scheduler) -> None:
        self.is_done = True
        for beam in self.beams:
            scheduler.finish(beam.seq, "stop")

    # --- sequences ---
    @staticmethod
    def _copy(seq: Sequence) -> Sequence:
        """A shallow copy with lists of its own."""
        child = copy.copy(seq)
        for f in dataclasses.fields(child):
            value = getattr(child, f.name)
            if isinstance(value, list):
                setattr(child, f.name, list(value))
        return child

    def _new_seq(self, like: Sequence) -> Sequence:
        self._num_forks += 1
        seq = self._copy(like)
        seq.seq_id = f"{like.group_id}#beam{self._num_forks}"
        seq.fork_order = self._num_forks
        return seq

    def _fork(self, parent: Sequence, scheduler: Scheduler) -> Sequence:
        child = self._new_seq(parent)
        scheduler.fork(parent, child)
        return child

    def restart(self, scheduler: Scheduler) -> None:
        """After a preemption of its beams: retire them, forget the hypotheses and queue the prompt again."""
        first = self.beams[0].seq
        for beam in self.beams:
            scheduler.finish(beam.seq, "abort")
        root = self._new_seq(self._prompt)
        root.status = Status.WAITING
        # scheduled before: its queue time and prefix-cache lookup are not counted again
        root.first_scheduled_time, root.num_cached_tokens = first.first_scheduled_time, first.num_cached_tokens
        root.num_preemptions = first.num_preemptions
        self.beams = [_Beam(root, 0.0)]
        self.hypotheses = []
        self._candidates.clear()
        scheduler.add(root)

    # --- the result ---
    def outputs(self, detokenize: Callable[[list[int]], str]) -> list[CompletionDelta]:
        """The n best hypotheses, best first, as whole outputs (index i: the i-th best); when the search
        ended early (aborted, failed), n empty outputs with the sequences' finish reason."""
        if not self.is_done:
            reason = self.beams[0].seq.finish_reason
            return [CompletionDelta(i, "", [], finish_reason=reason) for i in range(self.num_return)]
        return [CompletionDelta(i, detokenize(h.token_ids), list(h.token_ids), finish_reason=h.finish_reason)
                for i, h in enumerate(self.hypotheses[:self.num_return])]
