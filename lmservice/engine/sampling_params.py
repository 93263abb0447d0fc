"""Per-request sampling parameters and the bounds they are checked against (torch-free).

`SamplingParams.validate()` is the one place where every sampling field is
range-checked; the API adds only JSON types, finiteness and valid Unicode (its
schemas) and the count of prompts per HTTP request. Whatever passes here can be
held by the sampler's tensors: no request can fail the batch it runs in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_LOGPROBS = 20  # as OpenAI

# NOTE: the one list of the sampling fields a client sets by name on every generating endpoint (OpenAI's
# names, plus vLLM's extras), each with what the API documents about it. The HTTP schema's fields
# (lmservice/api/schemas/common.py) and the request -> SamplingParams mapping (lmservice/serving/sampling.py)
# are built from it, with the types and defaults of SamplingParams below. The other SamplingParams fields are
# the endpoints' own (n, logprobs, prompt_logprobs) or not a client's to set.
SAMPLING_FIELDS: dict[str, str] = {
    "max_tokens": "Most tokens to generate (default: per endpoint).",
    "temperature": "0 is greedy. Default 1 (0 with beam search).",
    "top_p": "",
    "top_k": "0 or -1: off.",
    "min_p": "",
    "presence_penalty": "",
    "frequency_penalty": "",
    "repetition_penalty": "",
    "logit_bias": "Token id (as a string) -> bias in [-100, 100].",
    "seed": "Per-request sampling seed: same seed, same tokens.",
    "stop": "A string or a list of strings; never part of the output.",
    "stop_token_ids": "",
    "min_tokens": "",
    "ignore_eos": "",
    "length_penalty": "Beam search: a finished beam scores sum(logprobs) / generated_tokens**length_penalty.",
    "early_stopping": 'Beam search: true, false or "never" (as transformers).',
}


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """Caps an operator may change (server flags of the same names) on what one request carries.
    Each bounds per-step work that would otherwise grow with the request: the sampler's bias
    scatter, the stop-string automaton, the sequences of one request."""

    max_n: int = 128  # sequences per request (n, and num_beams)
    max_logit_bias: int = 1024  # entries of logit_bias
    max_stop: int = 64  # stop strings, and separately stop token ids, per request
    max_stop_length: int = 256  # characters of one stop string


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
    num_beams: int = 1  # beam search when > 1 (lmservice/engine/beam.py); n of the beams are returned
    length_penalty: float = 1.0  # beam search: a finished beam scores sum(logprobs) / length**length_penalty
    early_stopping: bool | str = False  # beam search: True, False or "never", with transformers' meanings

    MAX_LOGPROBS = MAX_LOGPROBS

    def validate(self, vocab_size: int, limits: RequestLimits | None = None) -> None:
        """Raise ValueError naming the parameter and its limit (`.param` is the field's name)."""
        limits = limits or RequestLimits()

        def bad(param: str, msg: str) -> ValueError:
            err = ValueError(f"{param}: {msg}")
            err.param = param  # type: ignore[attr-defined]
            return err

        def integer(param: str, value, low: int, high: int, what: str) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise bad(param, f"must be {what}, got {value!r}")

        def number(param: str, value, low: float, high: float, what: str, low_open: bool = False) -> None:
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not low <= value <= high or (low_open and value == low)):
                raise bad(param, f"must be {what}, got {value!r}")

        integer("n", self.n, 1, limits.max_n, f"between 1 and {limits.max_n} (--max-n)")
        if self.max_tokens is not None:
            integer("max_tokens", self.max_tokens, 0, 2**31 - 1, "a non-negative integer")
        integer("min_tokens", self.min_tokens, 0, self.max_tokens if self.max_tokens is not None else 2**31 - 1,
                "between 0 and max_tokens")
        number("temperature", self.temperature, 0.0, 100.0, "in [0, 100]")
        if self.top_k not in (-1, 0):
            integer("top_k", self.top_k, 1, vocab_size, f"-1, 0 (off) or between 1 and the vocabulary size {vocab_size}")
        number("top_p", self.top_p, 0.0, 1.0, "in (0, 1]", low_open=True)
        number("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        number("repetition_penalty", self.repetition_penalty, 0.0, 100.0, "in (0, 100]", low_open=True)
        number("presence_penalty", self.presence_penalty, -2.0, 2.0, "in [-2, 2]")
        number("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "in [-2, 2]")
        for name, value in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            if value is not None:
                integer(name, value, 0, MAX_LOGPROBS, f"between 0 and {MAX_LOGPROBS}")
        if self.seed is not None:
            integer("seed", self.seed, SEED_MIN, SEED_MAX, "in [-2^63, 2^64 - 1]")
        if len(self.stop) > limits.max_stop:
            raise bad("stop", f"at most {limits.max_stop} stop sequences (--max-stop), got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", "stop sequences must be non-empty strings")
            if len(s) > limits.max_stop_length:
                raise bad("stop", f"a stop sequence has at most {limits.max_stop_length} characters "
                                  f"(--max-stop-length), got {len(s)}")
        if len(self.stop_token_ids) > limits.max_stop:
            raise bad("stop_token_ids",
                      f"at most {limits.max_stop} stop token ids (--max-stop), got {len(self.stop_token_ids)}")
        for tid in self.stop_token_ids:
            integer("stop_token_ids", tid, 0, vocab_size - 1, f"token ids in [0, {vocab_size - 1}]")
        bias = self.logit_bias or {}
        if len(bias) > limits.max_logit_bias:
            raise bad("logit_bias",
                      f"at most {limits.max_logit_bias} entries (--max-logit-bias), got {len(bias)}")
        for tid, value in bias.items():
            integer("logit_bias", tid, 0, vocab_size - 1, f"keyed by token ids in [0, {vocab_size - 1}]")
            number("logit_bias", value, -100.0, 100.0, "values in [-100, 100]")
        self._validate_beam_search(limits, bad, integer, number)

    def _validate_beam_search(self, limits: RequestLimits, bad, integer, number) -> None:
        """num_beams, length_penalty and early_stopping, and what does not combine with beam search: it ranks
        the model's own log-probabilities, so nothing that reshapes or samples them, and it picks among
        whole hypotheses, so no per-token logprobs and no stop strings (docs/api.md#beam-search)."""
        integer("num_beams", self.num_beams, 1, limits.max_n, f"between 1 and {limits.max_n} (--max-n)")
        number("length_penalty", self.length_penalty, -10.0, 10.0, "in [-10, 10]")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise bad("early_stopping", f'must be true, false or "never", got {self.early_stopping!r}')
        if self.num_beams == 1:
            if self.length_penalty != 1.0:
                raise bad("length_penalty", "applies to beam search only (num_beams > 1)")
            if self.early_stopping is not False:
                raise bad("early_stopping", "applies to beam search only (num_beams > 1)")
            return
        if self.n > self.num_beams:
            raise bad("n", f"at most num_beams ({self.num_beams}) with beam search, got {self.n}")
        unsupported = {
            "temperature": not self.is_greedy, "top_p": self.top_p != 1.0, "top_k": self.top_k not in (0, -1),
            "min_p": self.min_p != 0.0, "repetition_penalty": self.repetition_penalty != 1.0,
            "presence_penalty": self.presence_penalty != 0.0, "frequency_penalty": self.frequency_penalty != 0.0,
            "logit_bias": bool(self.logit_bias), "min_tokens": self.min_tokens != 0, "stop": bool(self.stop),
            "stop_token_ids": bool(self.stop_token_ids), "logprobs": self.logprobs is not None,
            "prompt_logprobs": self.prompt_logprobs is not None,
        }
        for param, is_set in unsupported.items():
            if is_set:
                what = "must be 0" if param == "temperature" else "is not supported"
                raise bad(param, f"{what} with beam search (num_beams {self.num_beams}), got {getattr(self, param)!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5  # below that, logits / temperature overflows: the same as greedy
