"""The embed task through the engine: mean-pooled final hidden states, L2-normalised, equal to transformers'
GPT2Model whatever the batch, chunking or preemption around them."""

from __future__ import annotations

import torch
from transformers import GPT2Model

from lmservice.engine.sampling_params import SamplingParams
from tests.helpers import prompts, run_to_completion

EMBED = SamplingParams(max_tokens=0, temperature=0.0)


def reference(model_dir, ids: list[int]) -> torch.Tensor:
    hf = GPT2Model.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hidden = hf(torch.tensor([ids])).last_hidden_state[0]  # (T, C), after ln_f
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)


def _embed(engine, batch, **kw):
    out = run_to_completion(engine, [(str(i), p, EMBED, None, "embed") for i, p in enumerate(batch)], **kw)
    return [torch.tensor(out[str(i)]["events"][-1].embedding) for i in range(len(batch))]


def test_embeddings_match_mean_pooled_gpt2model(tiny_engine, tiny_model_dir):
    batch = prompts(5, 1000, 3, 45, seed=11)
    got = _embed(tiny_engine(), batch)
    for ids, vector in zip(batch, got, strict=True):
        assert torch.allclose(vector, reference(tiny_model_dir, ids), atol=1e-5)
        assert abs(vector.norm().item() - 1.0) < 1e-5


def test_chunked_prefill_and_a_shared_prefix_give_the_same_vectors(tiny_engine):
    batch = prompts(4, 1000, 20, 40, seed=12)
    batch.append(batch[0] + [7, 8, 9])  # shares a prefix: embeddings never take cached blocks
    alone = [_embed(tiny_engine(), [p])[0] for p in batch]
    chunked = _embed(tiny_engine(max_num_batched_tokens=7, block_size=4), batch, stagger=1)
    for a, b in zip(alone, chunked, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_embedding_requests_mixed_with_generation_leave_it_unchanged(tiny_engine):
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    alone = run_to_completion(tiny_engine(), [("g", [1, 2, 3], greedy)])["g"]["tokens"][0]
    engine = tiny_engine()
    out = run_to_completion(engine, [("g", [1, 2, 3], greedy), ("e", [1, 2, 3, 4], EMBED, None, "embed")])
    assert out["g"]["tokens"][0] == alone
    assert out["e"]["events"][-1].embedding is not None and out["e"]["tokens"].get(0, []) == []
    assert engine.pool.num_used_blocks == 0
