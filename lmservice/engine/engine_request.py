"""The one value that crosses into the engine: a request already checked against it (torch-free).

`RequestValidator.check` is the only place a request is validated: prompt ids in
the vocabulary, every sampling field in range (`SamplingParams.validate`), the
prompt plus max_tokens within the context and within the KV cache. What it
returns, an `EngineRequest`, is trusted by `Engine.add_request` as it is. The
validator is immutable, so the event loop checks requests with it off the
engine thread, and a bad request is refused before anything is queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmservice.engine.outputs import RequestRejectedError
from lmservice.engine.sampling_params import RequestLimits, SamplingParams

# classify: one prefill, then the score head; embed: one prefill, the final hidden states mean-pooled.
# Neither samples anything.
EngineTask = Literal["generate", "classify", "embed"]
PREFILL_ONLY = ("classify", "embed")


@dataclass(frozen=True, kw_only=True)
class EngineRequest:
    """One prompt and its n sequences (1 for classify), resolved: `adapter` is the served adapter's name
    (None: the base model) and `max_tokens` the number of tokens it may generate within the context."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    max_tokens: int
    task: EngineTask = "generate"
    adapter: str | None = None
    priority: int = 0
    grammar: object | None = None  # structured output: a compiled template; each sequence gets its own copy

    @property
    def num_seqs(self) -> int:
        """Sequences it queues: a beam search starts as one and forks its beams as it runs."""
        return 1 if self.task in PREFILL_ONLY or self.params.num_beams > 1 else self.params.n

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens this request puts in the waiting queue (each of its sequences holds the prompt)."""
        return self.num_seqs * len(self.prompt_token_ids)


@dataclass(frozen=True, kw_only=True)
class RequestValidator:
    """What a request is checked against: the model's vocabulary and context, the KV cache's size
    and the operator's limits on what one request may carry."""

    vocab_size: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    limits: RequestLimits
    max_num_seqs: int = 2**31 - 1  # the scheduler's: a beam search runs all its beams in one step

    def check(self, request_id: str, prompt_token_ids: list[int] | tuple[int, ...], params: SamplingParams, *,
              task: EngineTask = "generate", adapter: str | None = None, priority: int = 0,
              grammar: object | None = None) -> EngineRequest:
        """The request, validated; raises RequestRejectedError naming the parameter and its limit."""
        prompt = tuple(prompt_token_ids)
        if grammar is not None and task != "generate":
            raise RequestRejectedError("structured output applies to generation only", "structured_outputs")
        if grammar is not None and params.num_beams > 1:
            raise RequestRejectedError("structured output (response_format, structured_outputs) does not combine "
                                       "with beam search", "structured_outputs")
        num_prompt = len(prompt)
        if num_prompt == 0:
            raise RequestRejectedError("the prompt is empty", "prompt")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt):
            raise RequestRejectedError(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        try:
            params.validate(self.vocab_size, self.limits)
        except ValueError as e:
            raise RequestRejectedError(str(e), getattr(e, "param", None)) from e
        if task in PREFILL_ONLY:
            max_tokens = 0
            if num_prompt > self.max_model_len:
                raise RequestRejectedError(
                    f"the input has {num_prompt} tokens; the model's context is {self.max_model_len}", "input")
        else:
            room = self.max_model_len - num_prompt
            max_tokens = room if params.max_tokens is None else params.max_tokens
            if max_tokens > room or (params.max_tokens is None and room < 1) or room < 0:
                raise RequestRejectedError(
                    f"the prompt has {num_prompt} tokens and max_tokens is {max_tokens}: more than the model's "
                    f"context of {self.max_model_len} tokens", "max_tokens")
        # a request the whole pool cannot hold would wait forever
        num_blocks_needed = -(-(num_prompt + max_tokens) // self.block_size)
        if params.num_beams > 1 and task == "generate":
            if params.num_beams > self.max_num_seqs:
                raise RequestRejectedError(f"num_beams: at most --max-num-seqs ({self.max_num_seqs}), "
                                           f"got {params.num_beams}", "num_beams")
            # the beams share the prompt's full blocks; each may hold the rest on its own
            num_shared = num_prompt // self.block_size
            num_blocks_needed = num_shared + params.num_beams * (num_blocks_needed - num_shared)
        if num_blocks_needed > self.num_kv_blocks:
            raise RequestRejectedError(
                f"the request needs {num_blocks_needed} KV blocks and the cache has {self.num_kv_blocks} "
                "(raise --kv-cache-memory-mb)", "max_tokens")
        return EngineRequest(request_id=request_id, prompt_token_ids=prompt, params=params, max_tokens=max_tokens,
                             task=task, adapter=adapter, priority=priority, grammar=grammar)
