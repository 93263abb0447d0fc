"""What the engine hands back to its callers (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field


class QueueFullError(Exception):
    """The waiting queue is at its bound (requests or tokens); retry later (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestRejectedError(ValueError):
    """A request the engine can never run (too long for the context, unknown adapter, ...): HTTP 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineRequestError(RuntimeError):
    """A request failed inside the engine; it failed alone and the engine went on."""


@dataclass
class TokenLogprob:
    """One position: the chosen token's logprob and the top-n alternatives (token_id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionDelta:
    """What one of the request's n sequences produced since the previous output.

    text is the new detokenized text only (never a broken UTF-8 character, never
    a part of a stop string); token_ids and logprobs the new tokens.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it


@dataclass
class RequestOutput:
    """One event on a request's stream. The last one has finished=True."""

    request_id: str
    outputs: list[CompletionDelta]
    finished: bool = False
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0  # over all n sequences, so far
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first event only; position 0 is None
    scores: list[float] | None = None  # classify: label probabilities
    embedding: list[float] | None = None  # embed: the L2-normalised mean of the final hidden states
    error: str | None = None
    # timings (time.monotonic()): for TTFT / queue-time metrics
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
