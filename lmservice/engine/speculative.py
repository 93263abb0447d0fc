"""Speculative decoding: guess a few tokens ahead, check them all in one forward, keep the ones the model agrees with.

A proposer guesses up to `num_speculative_tokens` tokens for a sequence that is decoding. The scheduler gives
the sequence 1 + k new tokens in one step (its pending token and the k guesses, KV slots allocated for all of
them, prefix-cache hashes published only for verified tokens); the runner computes logits at all 1 + k positions
and samples each position as if the guesses before it had been generated (same penalties, same seeded draws);
the engine keeps the guesses up to the first one that differs from what the model sampled, then the model's own
token at that position (or the bonus token after the last guess). So:

- greedy output is the non-speculative greedy output, token for token;
- sampled output: proposals are deterministic (a point-mass draft q), and a guess d is kept exactly when the
  model's own draw at that position is d, with probability p(d) = min(1, p(d) / q(d)); a rejection leaves the
  model's draw, which is distributed as p without d, renormalised: the residual (p - q)+ of Leviathan et al.
  (2023). Seeded sequences consume their generator once per emitted token, as without speculation, so a
  seeded request gives the same tokens with speculation on or off;
- the rejected guesses' KV slots are overwritten by the next step and the blocks past the sequence's end go
  back to the pool (KVCacheManager.trim).

Proposers (torch-free here; the draft model's lives in draft_model.py):
- `ngram`: prompt lookup. The last n tokens (n from `ngram_max` down to `ngram_min`) are searched for earlier in
  the sequence (prompt and output); the tokens that followed the latest earlier match are the guess. No model,
  no memory; helps when the output repeats or copies its input (editing, extraction, code, summaries).
- `draft`: a small model with the base's tokenizer guesses greedily (draft_model.py).

Rows that do not speculate: structured output (a grammar decides what may follow, checked one token at a time),
beam search (each beam ranks its best 2k next tokens), prompt-logprob and pooling tasks, sequences still in
prefill. LoRA rows speculate with n-gram guesses only (a
draft model has no adapter: its guesses would mostly be wasted). Speculation switches itself off for a step
whose decoding batch is larger than `speculative_disable_batch_size`: there the step is no longer bound by
reading the weights, and verifying guesses costs more than it saves (docs/benchmarks.md has the measurement).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from lmservice.engine.request import Sequence


@dataclass(frozen=True, kw_only=True)
class SpeculativeConfig:
    method: str = "ngram"  # ngram | draft
    num_speculative_tokens: int = 3
    ngram_min: int = 2  # shortest suffix looked up
    ngram_max: int = 4  # longest suffix looked up (tried first)
    disable_batch_size: int = 2  # no speculation in a step with more decoding sequences than this
    draft_model: str | None = None  # directory of the draft model (method "draft")

    @classmethod
    def parse(cls, spec: str | None, **options) -> SpeculativeConfig | None:
        """`ngram` or `draft:DIR` (the --speculative flag) -> the config; None or "" or "off": no speculation."""
        if spec is None or spec in ("", "off", "none"):
            return None
        method, _, arg = spec.partition(":")
        if method == "ngram" and not arg:
            config = cls(method="ngram", **options)
        elif method == "draft" and arg:
            config = cls(method="draft", draft_model=arg, **options)
        else:
            raise ValueError(f"--speculative must be 'ngram' or 'draft:DIR', got {spec!r}")
        config.check()
        return config

    def check(self) -> None:
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be between 1 and 16, got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if self.disable_batch_size < 0:
            raise ValueError("speculative_disable_batch_size must be >= 0")


@dataclass
class SpecDecodeStats:
    """Speculative decoding since start (vLLM's spec_decode counters): rows that carried guesses, guesses,
    guesses accepted, tokens emitted by those rows (accepted + the model's own), accepted per position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def record(self, num_guesses: int, num_emitted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_guesses
        self.num_accepted_tokens += accepted
        self.num_emitted_tokens += num_emitted
        if len(self.accepted_per_pos) < num_guesses:
            self.accepted_per_pos.extend([0] * (num_guesses - len(self.accepted_per_pos)))
        for pos in range(accepted):
            self.accepted_per_pos[pos] += 1


def can_speculate(seq: Sequence) -> bool:
    """Whether this decoding sequence may carry guesses: it generates text and nothing makes each token
    depend on a check that runs one token at a time (a grammar)."""
    return (seq.task == "generate" and seq.grammar is None and seq.params.prompt_logprobs is None
            and seq.params.num_beams == 1)  # a beam ranks 2k candidates, not one token


def ngram_propose(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens, trying
    the longest n first. `tokens` is the whole sequence (prompt + output) as an int array."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n:]
        # windows starting at 0 .. length - n - 1: every earlier position the suffix could start at
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


class Proposer(Protocol):
    """Guesses for decoding sequences: `propose` before scheduling (up to budget[i] tokens each), `fill` after
    it (a proposer that needs the guesses' KV slots makes them there, in place of placeholders)."""

    def propose(self, seqs: list[Sequence], budget: list[int]) -> list[list[int]]: ...

    def fill(self, sched) -> None: ...


class NgramProposer:
    """Prompt lookup over each sequence's own tokens."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

    def fill(self, sched) -> None:
        """Nothing to do: the guesses were whole before scheduling."""

    def propose(self, seqs: list[Sequence], budget: list[int]) -> list[list[int]]:
        c = self.config
        out = []
        for seq, k in zip(seqs, budget, strict=True):
            if k <= 0:
                out.append([])
                continue
            tokens = np.asarray(seq.prompt_token_ids + seq.output_token_ids, dtype=np.int64)
            out.append(ngram_propose(tokens, k, c.ngram_min, c.ngram_max))
        return out


def accept(proposed: list[int], sampled: list[int]) -> list[int]:
    """The tokens a speculating row emits: the guesses up to the first the model disagrees with, then the
    model's own token there (or after the last guess). `sampled[j]` is the model's token at position j given
    the guesses before it; len(sampled) == len(proposed) + 1."""
    emitted = []
    for guess, token in zip(proposed, sampled, strict=False):
        emitted.append(token)
        if token != guess:
            return emitted
    emitted.append(sampled[len(proposed)])
    return emitted


class Speculator:
    """Decides, before each step, which decoding sequences carry guesses and asks the proposer for them."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config = config
        self.proposer = proposer

    @classmethod
    def build(cls, engine_config, loaded, engine) -> Speculator | None:
        """The speculator the engine config asks for; None when speculation is off."""
        config = SpeculativeConfig.parse(
            engine_config.speculative, num_speculative_tokens=engine_config.num_speculative_tokens,
            ngram_min=engine_config.speculative_ngram_min, ngram_max=engine_config.speculative_ngram_max,
            disable_batch_size=engine_config.speculative_disable_batch_size)
        if config is None:
            return None
        if config.method == "draft":
            # torch and a second model: only when a draft model is asked for
            from lmservice.engine.draft_model import DraftProposer

            return cls(config, DraftProposer.load(config, loaded, engine))
        return cls(config, NgramProposer(config))

    @property
    def name(self) -> str:
        c = self.config
        what = "n-gram prompt lookup" if c.method == "ngram" else f"draft model {c.draft_model}"
        return f"{what}, {c.num_speculative_tokens} tokens, off above {c.disable_batch_size} decoding sequences"

    def fill(self, sched) -> None:
        """After scheduling: a proposer that guesses once the guesses have slots (a draft model) does it here."""
        self.proposer.fill(sched)

    def propose(self, running: list[Sequence], max_model_len: int) -> None:
        for seq in running:
            seq.spec_token_ids = []
        decoding = [s for s in running if s.num_computed_tokens == s.num_tokens - 1]
        if not decoding or len(decoding) > self.config.disable_batch_size:
            return
        seqs = [s for s in decoding if can_speculate(s)]
        k = self.config.num_speculative_tokens
        # never more than the sequence may still emit (guesses + the model's token) or the context can hold
        budget = [min(k, s.max_tokens - s.num_output_tokens - 1, max_model_len - s.num_tokens - 1) for s in seqs]
        for seq, guesses in zip(seqs, self.proposer.propose(seqs, budget), strict=True):
            seq.spec_token_ids = guesses
