"""top_k and top_p together: each keeps its own cut, whatever the other is (a sampler that dropped top_k
whenever top_p < 1 would sample outside the top k here), row by row in one batch."""

from __future__ import annotations

import torch

from lmservice.engine.sampler import Sampler, SamplingBatch
from lmservice.engine.sampling_params import SamplingParams


def _sample(logits: torch.Tensor, params: list[SamplingParams]) -> list[int]:
    n = len(params)
    batch = SamplingBatch(params=params, generators=[None] * n, output_token_ids=[[] for _ in range(n)],
                          prompt_token_ids=[[] for _ in range(n)], eos_token_id=0)
    return Sampler(logits.shape[1], seed=0)(logits, batch).token_ids


def test_every_token_is_among_the_top_k_when_top_p_is_below_1():
    torch.manual_seed(0)
    vocab, rows = 64, 300
    logits = torch.randn(rows, vocab) * 0.5  # flat: top_p 0.95 alone keeps dozens of tokens
    for top_k, top_p in [(1, 0.5), (3, 0.95), (5, 0.99), (10, 0.8)]:
        params = [SamplingParams(temperature=1.5, top_k=top_k, top_p=top_p)] * rows
        top = logits.topk(top_k, dim=-1).indices
        sampled = _sample(logits.clone(), params)
        assert all(t in top[i].tolist() for i, t in enumerate(sampled)), (top_k, top_p)
        assert len(set(sampled)) > top_k  # rows differ: the check is not passed by one lucky token


def test_top_p_still_cuts_inside_the_top_k():
    logits = torch.tensor([[5.0, 4.9, 0.0, -0.1, -0.2, -9.0]]).repeat(400, 1)
    both = set(_sample(logits.clone(), [SamplingParams(temperature=1.0, top_k=4, top_p=0.6)] * 400))
    assert both == {0, 1}  # top_k 4 keeps 0-3; renormalised over them token 0 has 0.52 < 0.6, 0-1 have 0.99
    k_only = set(_sample(logits.clone(), [SamplingParams(temperature=1.0, top_k=4)] * 400))
    assert k_only <= {0, 1, 2, 3} and len(k_only) > 2


def test_mixed_rows_keep_their_own_filters():
    torch.manual_seed(1)
    logits = torch.randn(1, 32).repeat(600, 1) * 0.3
    params = [SamplingParams(temperature=1.0, top_k=2, top_p=0.9), SamplingParams(temperature=1.0, top_p=0.9),
              SamplingParams(temperature=1.0, top_k=3)] * 200
    sampled = _sample(logits.clone(), params)
    order = logits[0].argsort(descending=True).tolist()
    assert {sampled[i] for i in range(0, 600, 3)} <= set(order[:2])
    assert len({sampled[i] for i in range(1, 600, 3)}) > 3  # top_p alone keeps many here
    assert {sampled[i] for i in range(2, 600, 3)} <= set(order[:3])
