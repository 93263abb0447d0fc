"""Greedy parity with transformers' GPT2LMHeadModel, whatever the batching around each request."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from lmservice.engine.engine import Engine, EngineConfig
from lmservice.engine.sampling_params import SamplingParams
from lmservice.model.loader import load_model
from tests.helpers import make_gpt2_dir, prompts, run_to_completion

SHAPES = {
    "gpt2-small": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    "odd": dict(vocab_size=1000, n_positions=128, n_embd=96, n_layer=2, n_head=3),
    "untied": dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=3, n_head=4, tie_word_embeddings=False),
}
NUM_NEW = {"gpt2-small": 4, "odd": 10, "untied": 10}


def _prompt_set(vocab_size: int) -> list[list[int]]:
    base = prompts(12, vocab_size, 1, 40, seed=3)
    # four prompts sharing long prefixes with others, so that the prefix cache gets hits
    shared = [base[0] + [5, 6, 7], base[0][:17] + [9], base[1] + base[2], list(base[3])]
    return base + shared


@pytest.fixture(scope="module", params=list(SHAPES))
def reference(request, tmp_path_factory):
    """Model dir, prompts, and transformers' greedy tokens + per-step log-softmax."""
    name = request.param
    model_dir = make_gpt2_dir(tmp_path_factory.mktemp(name) / "model", seed=2, **SHAPES[name])
    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ps = _prompt_set(SHAPES[name]["vocab_size"])
    expected = []
    with torch.no_grad():
        for p in ps:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_NEW[name], do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            tokens = out.sequences[0, len(p):].tolist()
            logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)]
            expected.append((tokens, logprobs))
    return name, model_dir, ps, expected


ENGINE_VARIANTS = {
    "default": dict(),
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "chunked": dict(max_num_batched_tokens=7),
    "preempting": dict(num_kv_blocks=10, block_size=8),
    "block-size-1": dict(block_size=1, num_kv_blocks=1200),
    "block-size-32": dict(block_size=32, num_kv_blocks=40),
    # fp32 projections on each CPU matmul path, whatever `auto` picks on this machine (lmservice/model/cpu_linear.py)
    "linears-torch": dict(linear_backend="torch"),
    "linears-onednn": dict(linear_backend="onednn"),
}


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_greedy_parity(reference, variant):
    name, model_dir, ps, expected = reference
    if name == "gpt2-small" and not variant.startswith(("default", "linears")):
        pytest.skip("the gpt2-small shape runs the default engine only (time)")
    kwargs = dict(num_kv_blocks=256)
    kwargs.update(ENGINE_VARIANTS[variant])
    linear_backend = kwargs.pop("linear_backend", "auto")
    loaded = load_model(model_dir, device="cpu", dtype="float32", linear_backend=linear_backend)
    if linear_backend != "auto":
        assert (type(loaded.model.lm_head).__name__ == "OneDNNLinear") == (linear_backend == "onednn")
    engine = Engine(loaded, EngineConfig.from_fields(**kwargs))
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW[name], ignore_eos=True, logprobs=2)
    requests = [(f"r{i}", p, params) for i, p in enumerate(ps)]
    results = run_to_completion(engine, requests, stagger=3)

    for i, (tokens, logprobs) in enumerate(expected):
        got = results[f"r{i}"]
        assert got["tokens"][0] == tokens, f"prompt {i} (len {len(ps[i])})"
        got_lp = [lp.logprob for lp in got["logprobs"][0]]
        assert got_lp == pytest.approx(logprobs, abs=1e-4)
        assert got["finish"][0] == ("length", None)
    if variant == "preempting":
        assert engine.scheduler.num_preemptions > 0
    if variant == "default":
        assert engine.pool.num_hits > 0, "shared prefixes should have hit the prefix cache"
    # idle engine: every block free (cached prefixes stay evictable)
    assert engine.pool.num_used_blocks == 0
    assert not engine.groups


def test_decode_graph_padding_path_keeps_parity(reference):
    """The CUDA-graph decode path (static buffers, batch padded to a bucket), run eagerly on CPU."""
    from lmservice.engine.cuda_graphs import DecodeGraphs

    name, model_dir, ps, expected = reference
    if name == "gpt2-small":
        pytest.skip("the padding logic does not depend on the shape")
    engine = Engine(load_model(model_dir, device="cpu", dtype="float32"), EngineConfig.from_fields(num_kv_blocks=256))
    runner = engine.runner
    max_blocks = -(-engine.max_model_len // engine.config.block_size)
    runner.fast_path = graphs = DecodeGraphs(runner.model, runner.ops, runner.kv_caches, 12, max_blocks,
                                             runner.device, capture=False)
    calls = []
    run = graphs.run
    graphs.run = lambda batch: calls.append(batch.num_decodes) or run(batch)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW[name], ignore_eos=True)
    results = run_to_completion(engine, [(f"r{i}", p, params) for i, p in enumerate(ps)], stagger=3)
    for i, (tokens, _) in enumerate(expected):
        assert results[f"r{i}"]["tokens"][0] == tokens, f"prompt {i}"
    assert calls and any(n not in graphs.buckets for n in calls)  # some steps were padded
    assert max(calls) <= 12  # larger decode batches fell back to the eager path
