"""Turning the step's logits into tokens: one pass over the whole batch on tensors.

Rows are the sequences that sample this step. Per-row parameters arrive as
tensors; penalties, bias, top-k/top-p/min-p are masks over the batch. Random
rows sample by the exponential race (argmax of p / q, q ~ Exp(1)), which equals
sampling from p. A seeded row draws its q from its own generator, once per
token, so it samples the same tokens alone or inside any batch.

A row fails alone: if the batched pass raises (a value validation let through),
the seeded generators are rewound and every row is sampled on its own: greedy and
seeded rows get exactly the tokens they would have had, unseeded rows fresh draws
from the same distribution, and only the bad row an error.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch

from lmservice.engine.grammar import GrammarMasks
from lmservice.engine.sampling_params import SamplingParams

log = logging.getLogger("lmservice.engine")


@dataclass
class SamplingBatch:
    """Per-row inputs of one sampling pass (built by the runner from the scheduled sequences)."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]  # a seeded row's own generator
    output_token_ids: list[list[int]]  # tokens generated so far (penalties, min_tokens)
    prompt_token_ids: list[list[int]]  # for the repetition penalty
    eos_token_id: int | None
    # structured output: a row's allowed tokens (lmservice/engine/grammar.py); None: no row is constrained
    bitmask: torch.Tensor | None = None
    masks: GrammarMasks | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None  # of each sampled token: the model's distribution (masked by a grammar, if any)
    top_logprobs: list[list[tuple[int, float]]] | None  # top-n per row (n from the row's params)
    errors: dict[int, str] = field(default_factory=dict)  # row -> why it could not be sampled


def _padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def _counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """(B, V) occurrence counts of each row's tokens."""
    ids = _padded(rows, device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    counts.scatter_add_(1, ids.clamp(min=-1) % (vocab + 1), torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]  # padding (-1) landed in the extra last column


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)
        # id(params) -> (weak ref to it, token ids, biases): a request's logit_bias becomes tensors once
        self._bias_cache: dict[int, tuple[weakref.ref, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        states = [g.get_state() if g is not None else None for g in batch.generators]
        try:
            return self._sample_batch(logits, batch)
        except Exception as e:  # noqa: BLE001 (isolated below, row by row)
            log.warning("sampling the batch failed (%s: %s); sampling its %d rows one by one",
                        type(e).__name__, e, logits.shape[0])
        for g, state in zip(batch.generators, states, strict=True):
            if g is not None:
                g.set_state(state)
        return self._sample_rows(logits, batch)

    def rewind(self, generator: torch.Generator, state: torch.Tensor, num_draws: int) -> None:
        """Put a seeded row's generator back to `state` advanced by `num_draws` of its per-token draws:
        a speculating sequence drew for every position it checked but keeps the draws of the tokens it
        emits, so its generator is where it would be without speculation."""
        generator.set_state(state)
        for _ in range(num_draws):
            torch.empty(self.vocab_size).exponential_(generator=generator)

    def _sample_rows(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        num_rows = logits.shape[0]
        out = SamplerOutput(token_ids=[0] * num_rows, logprobs=None, top_logprobs=None)
        if any(p.logprobs is not None for p in batch.params):
            out.logprobs, out.top_logprobs = [0.0] * num_rows, [[] for _ in range(num_rows)]
        for i in range(num_rows):
            row = SamplingBatch([batch.params[i]], [batch.generators[i]], [batch.output_token_ids[i]],
                                [batch.prompt_token_ids[i]], batch.eos_token_id,
                                None if batch.bitmask is None else batch.bitmask[i:i + 1], batch.masks)
            try:
                one = self._sample_batch(logits[i:i + 1], row)
            except Exception as e:  # noqa: BLE001 (this row fails alone)
                out.errors[i] = f"sampling failed: {type(e).__name__}: {e}"
                continue
            out.token_ids[i] = one.token_ids[0]
            if one.logprobs is not None and out.logprobs is not None:
                out.logprobs[i], out.top_logprobs[i] = one.logprobs[0], one.top_logprobs[0]
        return out

    def _sample_batch(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()  # (B, V)
        params = batch.params
        num_rows, vocab = logits.shape

        if batch.bitmask is not None:
            # first: logprobs are then those of the masked (renormalised) distribution, as vLLM reports them
            logits = batch.masks.apply(logits, batch.bitmask)
        want_logprobs = [p.logprobs for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(n is not None for n in want_logprobs) else None

        logits = self._apply_penalties_and_bias(logits, batch)

        greedy = [p.is_greedy for p in params]
        if all(greedy):
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = self._sample(logits, batch, greedy)

        out = SamplerOutput(token_ids=token_ids.tolist(), logprobs=None, top_logprobs=None)
        if raw_logprobs is not None:
            out.logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
            k = max(n or 0 for n in want_logprobs)
            top = [[] for _ in range(num_rows)]
            if k > 0:
                values, indices = raw_logprobs.topk(k, dim=-1)
                values, indices = values.tolist(), indices.tolist()
                for i, n in enumerate(want_logprobs):
                    if n:
                        top[i] = list(zip(indices[i][:n], values[i][:n], strict=True))
            out.top_logprobs = top
        return out

    def _apply_penalties_and_bias(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        params = batch.params
        device = logits.device
        num_rows, vocab = logits.shape
        rep = [p.repetition_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        if any(r != 1.0 for r in rep):
            seen = _counts([p + o for p, o in zip(batch.prompt_token_ids, batch.output_token_ids, strict=True)],
                           vocab, device) > 0
            penalty = torch.tensor(rep, device=device)[:, None].expand_as(logits)
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, penalized, logits)
        if any(pres) or any(freq):
            counts = _counts(batch.output_token_ids, vocab, device)
            logits = logits - torch.tensor(freq, device=device)[:, None] * counts
            logits = logits - torch.tensor(pres, device=device)[:, None] * (counts > 0).float()
        if any(p.logit_bias for p in params):
            # one scatter for the whole batch; each request's entries became tensors on its first step
            rows, ids, values = [], [], []
            for i, p in enumerate(params):
                if p.logit_bias:
                    tids, biases = self._bias_tensors(p)
                    rows.append(torch.full_like(tids, i))
                    ids.append(tids)
                    values.append(biases)
            logits = logits.index_put((torch.cat(rows).to(device), torch.cat(ids).to(device)),
                                      torch.cat(values).to(device), accumulate=True)
        # min_tokens: stop tokens are impossible until enough tokens were generated
        banned = [(i, p) for i, p in enumerate(params) if len(batch.output_token_ids[i]) < p.min_tokens]
        if banned:
            logits = logits.clone()
            for i, p in banned:
                stop_ids = list(p.stop_token_ids)
                # a constrained row keeps EOS: its grammar decides when it may end
                constrained = batch.bitmask is not None and not bool((batch.bitmask[i] == -1).all())
                if batch.eos_token_id is not None and not p.ignore_eos and not constrained:
                    stop_ids.append(batch.eos_token_id)
                if stop_ids:
                    logits[i, stop_ids] = float("-inf")
        return logits

    def _bias_tensors(self, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._bias_cache.get(id(params))
        if entry is not None and entry[0]() is params:
            return entry[1], entry[2]
        if len(self._bias_cache) >= 4096:  # forget the requests that are gone
            self._bias_cache = {k: v for k, v in self._bias_cache.items() if v[0]() is not None}
        bias = params.logit_bias or {}
        tids = torch.tensor([int(t) for t in bias], dtype=torch.long)
        biases = torch.tensor([float(b) for b in bias.values()], dtype=torch.float32)
        self._bias_cache[id(params)] = (weakref.ref(params), tids, biases)
        return tids, biases

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch, greedy: list[bool]) -> torch.Tensor:
        params = batch.params
        device = logits.device
        num_rows, vocab = logits.shape
        greedy_ids = logits.argmax(dim=-1)
        temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
        logits = logits / temperature[:, None]

        top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
            rank = torch.arange(vocab, device=device)[None, :]
            remove = rank >= torch.tensor(top_k, device=device)[:, None]
            probs_sorted = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
            # drop a token when the mass before it already reaches top_p (the top token always stays)
            mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
            remove |= mass_before >= torch.tensor(top_p, device=device)[:, None]
            remove[:, 0] = False
            logits = torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits.masked_fill(remove, float("-inf")))
        probs = logits.softmax(dim=-1)
        if any(m > 0 for m in min_p):
            threshold = torch.tensor(min_p, device=device)[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)

        q = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(batch.generators) if g is None]
        if unseeded:
            idx = torch.tensor(unseeded, device=device)
            q[idx] = torch.empty(len(unseeded), vocab).exponential_(generator=self.generator).to(device)
        for i, g in enumerate(batch.generators):
            if g is not None:
                q[i] = torch.empty(vocab).exponential_(generator=g).to(device)
        sampled = (probs / q).argmax(dim=-1)
        return torch.where(torch.tensor(greedy, device=device), greedy_ids, sampled)
