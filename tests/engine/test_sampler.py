"""Sampler semantics on fixed logits (no model): filters, penalties, seeds, logprobs."""

from __future__ import annotations

import pytest
import torch

from lmservice.engine.sampler import Sampler, SamplingBatch
from lmservice.engine.sampling_params import SamplingParams

V = 10
LOGITS = torch.tensor([[4.0, 3.0, 2.5, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0]])


def batch(params, outputs=None, prompts=None, seeded=False):
    n = len(params)
    gens = [torch.Generator().manual_seed(p.seed) if seeded and p.seed is not None else None for p in params]
    return SamplingBatch(params=params, generators=gens, output_token_ids=outputs or [[] for _ in range(n)],
                         prompt_token_ids=prompts or [[] for _ in range(n)], eos_token_id=9)


def draws(params, n=400):
    sampler = Sampler(V, seed=0)
    logits = LOGITS.repeat(n, 1)
    return set(sampler(logits, batch([params] * n)).token_ids)


def test_filters_restrict_the_support():
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    probs = LOGITS.softmax(-1)[0]  # 0.60, 0.22, 0.13, ...: top_p 0.9 keeps tokens 0-2
    assert probs[:2].sum() < 0.9 < probs[:3].sum()
    assert draws(SamplingParams(temperature=1.0, top_p=0.9)) == {0, 1, 2}
    assert draws(SamplingParams(temperature=1.0, min_p=0.3)) == {0, 1}  # p >= 0.3 * p_max
    assert draws(SamplingParams(temperature=1.0)) >= {0, 1, 2, 3}
    assert draws(SamplingParams(temperature=0.0, top_k=5)) == {0}


def test_presence_and_frequency_penalties_follow_openai():
    sampler = Sampler(V)
    params = SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.6)
    # logit - frequency * count - presence * (count > 0):
    # token 0: 4.0 - 3 * 0.6 - 1.0 = 1.2; token 1: 3.0 - 0.6 - 1.0 = 1.4; token 2: 2.5 - 4 * 0.6 - 1.0 = -0.9
    out = sampler(LOGITS.clone(), batch([params], outputs=[[0, 0, 0, 1, 2, 2, 2, 2]]))
    assert out.token_ids == [1]
    # token 0 once: 4.0 - 0.6 - 1.0 = 2.4 < token 1's untouched 3.0
    assert sampler(LOGITS.clone(), batch([params], outputs=[[0]])).token_ids == [1]
    # prompt tokens are not penalized by presence/frequency (they are by repetition_penalty)
    assert sampler(LOGITS.clone(), batch([params], prompts=[[0, 0]])).token_ids == [0]


def test_min_tokens_bans_eos_and_stop_ids():
    sampler = Sampler(V)
    logits = LOGITS.clone()
    logits[0, 9] = 100.0  # eos
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[0])
    assert sampler(logits.clone(), batch([params], outputs=[[3]])).token_ids == [1]
    assert sampler(logits.clone(), batch([params], outputs=[[3, 3]])).token_ids == [9]


def test_seeded_rows_ignore_their_neighbours():
    sampler = Sampler(V, seed=123)
    target = SamplingParams(temperature=1.5, seed=42)
    alone = Sampler(V, seed=0)(LOGITS.clone(), batch([target], seeded=True)).token_ids[0]
    mixed = sampler(LOGITS.repeat(3, 1), batch([SamplingParams(temperature=1.0), target,
                                               SamplingParams(temperature=1.0, seed=7)], seeded=True))
    assert mixed.token_ids[1] == alone


def test_logprobs_are_the_raw_distribution():
    sampler = Sampler(V)
    params = SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=2.0, logit_bias={5: 50.0})
    out = sampler(LOGITS.clone(), batch([params], prompts=[[0]]))
    raw = torch.log_softmax(LOGITS[0], -1)
    assert out.token_ids == [5]  # the bias decided the token...
    assert out.logprobs[0] == pytest.approx(raw[5].item())  # ...but logprobs are the model's
    assert [t for t, _ in out.top_logprobs[0]] == [0, 1, 2]


def test_logit_bias_of_many_rows_is_one_scatter_equal_to_the_dense_sum():
    sampler = Sampler(V)
    biases = [{1: 5.0, 7: 9.5}, None, {2: -3.0, 3: 4.5, 8: 10.0}]
    params = [SamplingParams(temperature=0.0, logit_bias=b) for b in biases]
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    dense = logits.clone()
    for row, bias in enumerate(biases):
        for tid, value in (bias or {}).items():
            dense[row, tid] += value
    for _ in range(2):  # the second step reads the request's cached tensors
        out = sampler(logits.clone(), batch(params))
        assert out.token_ids == dense.argmax(dim=-1).tolist()
    assert len(sampler._bias_cache) == 2  # one entry per request that carries a bias


def test_a_row_that_cannot_be_sampled_fails_alone_and_the_others_are_unchanged():
    """top_k past what a tensor holds (validation stops it at the API; the sampler must not need it to)."""
    good = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, seed=5),
            SamplingParams(temperature=0.9, seed=11, top_p=0.8)]
    hostile = SamplingParams(temperature=1.0, top_k=10**20, top_p=0.5)
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    alone = [Sampler(V)(logits[i:i + 1].clone(), batch([p], seeded=True)).token_ids[0] for i, p in enumerate(good)]
    mixed = Sampler(V)(logits.clone(), batch([*good, hostile], seeded=True))
    assert set(mixed.errors) == {3} and "sampling failed" in mixed.errors[3]
    assert mixed.token_ids[:3] == alone
