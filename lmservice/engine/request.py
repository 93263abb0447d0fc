"""Per-sequence state: the request holds its progress, batches are rebuilt each step (torch-free)."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from lmservice.engine.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sequence being generated (a request with n > 1 has n of them).

    Invariant: `num_computed_tokens <= num_tokens`; the KV of tokens
    [0, num_computed_tokens) is in the blocks of `block_ids`, in order.
    The scheduler moves num_computed_tokens up to num_tokens under a token
    budget; there is no prefill or decode mode.
    """

    seq_id: str
    group_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved against the context length
    priority: int = 0
    adapter: str | None = None  # LoRA adapter name (None: base)
    adapter_load_id: int | None = None  # which load of `adapter` (a name removed and added again is another)
    task: str = "generate"  # "generate" | "classify"
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_order: int = field(default_factory=lambda: next(_arrival_counter))
    fork_order: int = 0  # beam search: forks keep their request's place in line, in the order they were made

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first scheduling
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks so far
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    generator: object | None = None  # a seeded sequence's own torch.Generator (opaque here)
    grammar: object | None = None  # structured output: this sequence's own matcher (llguidance LLMatcher)
    pooled_sum: object | None = None  # embed: sum of the final hidden states computed so far (a tensor)
    spec_token_ids: list[int] = field(default_factory=list)  # guesses for the next step (speculative decoding)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Lower runs first: priority, then arrival (FCFS); unique (a beam's forks differ in fork_order)."""
        return (self.priority, self.arrival_order, self.fork_order)

    @property
    def adapter_key(self) -> tuple[str, int | None] | None:
        """The loaded adapter this sequence runs with (its LoRA weights, its score head); None: the base."""
        return None if self.adapter is None else (self.adapter, self.adapter_load_id)

    @property
    def prefix_cache_salt(self) -> str | None:
        """Blocks are keyed by adapter as well as tokens: the same prompt has other KV under another adapter,
        and under another load of the same name (a re-added adapter never reuses the old one's KV)."""
        return None if self.adapter is None else f"{self.adapter}#{self.adapter_load_id}"

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]
