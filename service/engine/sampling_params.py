"""Per-request sampling parameters (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How one request samples and when it stops. temperature 0 means greedy.

    `validate()` raises ValueError naming the bad parameter; the API maps that to 400.
    """

    n: int = 1
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0: only the sampled one)
    prompt_logprobs: int | None = None  # top-n logprobs per prompt token (for echo)
    skip_special_tokens: bool = True

    MAX_LOGPROBS = 20

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(param: str, msg: str) -> ValueError:
            err = ValueError(f"{param}: {msg}")
            err.param = param  # type: ignore[attr-defined]
            return err

        if not 1 <= self.n <= 128:
            raise bad("n", f"must be between 1 and 128, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise bad("max_tokens", f"must be >= 0, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise bad("min_tokens", f"must be between 0 and max_tokens, got {self.min_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", f"must be in [0, 100], got {self.temperature}")
        if self.top_k < -1:
            raise bad("top_k", f"must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        for name, value in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            if value is not None and not 0 <= value <= self.MAX_LOGPROBS:
                raise bad(name, f"must be between 0 and {self.MAX_LOGPROBS}, got {value}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "stop sequences must be non-empty strings")
        if vocab_size is not None:
            for tid in list(self.stop_token_ids) + list((self.logit_bias or {}).keys()):
                if not 0 <= int(tid) < vocab_size:
                    raise bad("logit_bias" if tid in (self.logit_bias or {}) else "stop_token_ids",
                              f"token id {tid} is outside the vocabulary (0..{vocab_size - 1})")
            for bias in (self.logit_bias or {}).values():
                if not -100.0 <= bias <= 100.0:
                    raise bad("logit_bias", f"bias must be in [-100, 100], got {bias}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5  # below that, logits / temperature overflows: the same as greedy
