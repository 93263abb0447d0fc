"""The engine on the Triton kernels (under the interpreter) keeps greedy parity with transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from lmservice.engine.engine import Engine, EngineConfig
from lmservice.engine.sampling_params import SamplingParams
from lmservice.model.loader import load_model
from tests.helpers import make_gpt2_dir, prompts, run_to_completion

NUM_NEW = 5


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """A 2-layer, n_embd 64 model; prompts crossing 8-token blocks; transformers' greedy tokens."""
    model_dir = make_gpt2_dir(tmp_path_factory.mktemp("triton-engine") / "model", seed=4)
    ps = prompts(4, 1000, 1, 20, seed=5)
    ps.append(ps[0] + [11, 12])  # shares a prefix: the second prefill attends to cached blocks
    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    expected = []
    with torch.no_grad():
        for p in ps:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_NEW, do_sample=False,
                              pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    return model_dir, ps, expected


@pytest.mark.parametrize("variant", [{}, {"max_num_batched_tokens": 7}], ids=["default", "chunked"])
def test_greedy_parity_on_triton_kernels(tiny_reference, variant):
    model_dir, ps, expected = tiny_reference
    config = EngineConfig.from_fields(num_kv_blocks=64, block_size=8, attention_backend="triton", **variant)
    engine = Engine(load_model(model_dir, device="cpu", dtype="float32"), config)
    assert engine.runner.ops.name == "triton"
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
    results = run_to_completion(engine, [(f"r{i}", p, params, None) for i, p in enumerate(ps)], stagger=2)
    for i, tokens in enumerate(expected):
        assert results[f"r{i}"]["tokens"][0] == tokens, f"prompt {i} (len {len(ps[i])})"
    if config.enable_prefix_caching and not variant:
        assert engine.pool.num_hits > 0, "the shared prefix should have been read from cached blocks"
    assert engine.pool.num_used_blocks == 0
