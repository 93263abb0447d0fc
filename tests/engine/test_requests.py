"""Per-request behaviour through the engine: sampling, stops, limits, n, logprobs, failures."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from lmservice.engine.outputs import RequestRejectedError
from lmservice.engine.sampling_params import SamplingParams
from tests.helpers import prompts, run_to_completion

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_seeded_sample_same_alone_and_in_batch(tiny_engine):
    target = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = run_to_completion(tiny_engine(), [("t", [5, 6, 7, 8], target)])["t"]["tokens"][0]
    others = [(f"o{i}", p, SamplingParams(temperature=1.0, max_tokens=9 + i, ignore_eos=True, seed=None if i % 2 else i))
              for i, p in enumerate(prompts(8, 1000, 2, 30, seed=5))]
    batch = run_to_completion(tiny_engine(), others[:4] + [("t", [5, 6, 7, 8], target)] + others[4:], stagger=2)
    assert batch["t"]["tokens"][0] == alone
    different_seed = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=99, max_tokens=12, ignore_eos=True)
    assert run_to_completion(tiny_engine(), [("t", [5, 6, 7, 8], different_seed)])["t"]["tokens"][0] != alone


def test_text_equals_decode_and_max_tokens(tiny_engine, tiny_model_dir):
    engine = tiny_engine()
    r = run_to_completion(engine, [("a", [1, 2, 3], SamplingParams(max_tokens=11, **GREEDY))])["a"]
    assert len(r["tokens"][0]) == 11 and r["finish"][0] == ("length", None)
    assert r["text"][0] == engine.tokenizer.decode(r["tokens"][0], skip_special_tokens=True)


def test_stop_string_across_tokens_is_cut_and_never_streamed(tiny_engine):
    engine = tiny_engine()
    full = run_to_completion(engine, [("a", [10, 20, 30], SamplingParams(max_tokens=20, **GREEDY))])["a"]
    tokens = full["tokens"][0]
    pieces = [engine.tokenizer.decode(tokens[:i]) for i in range(len(tokens) + 1)]
    # a stop string made of the end of token 4's text and the start of token 5's
    k = next(i for i in range(3, 15) if len(pieces[i]) - len(pieces[i - 1]) >= 1 and len(pieces[i + 1]) - len(pieces[i]) >= 1)
    stop = pieces[k][-1] + pieces[k + 1][len(pieces[k])]
    expected = pieces[k + 1][: pieces[k + 1].find(stop)]
    r = run_to_completion(engine, [("b", [10, 20, 30], SamplingParams(max_tokens=20, stop=[stop], **GREEDY))])["b"]
    assert r["finish"][0] == ("stop", stop)
    assert r["text"][0] == expected and stop not in r["text"][0]
    deltas = [c.text for e in r["events"] for c in e.outputs]
    assert "".join(deltas) == expected
    keep = run_to_completion(engine, [("c", [10, 20, 30], SamplingParams(
        max_tokens=20, stop=[stop], include_stop_str_in_output=True, **GREEDY))])["c"]
    assert keep["text"][0] == expected + stop


def test_stop_token_ids_and_min_tokens(tiny_engine):
    engine = tiny_engine()
    tokens = run_to_completion(engine, [("a", [4, 4], SamplingParams(max_tokens=8, **GREEDY))])["a"]["tokens"][0]
    r = run_to_completion(engine, [("b", [4, 4], SamplingParams(max_tokens=8, stop_token_ids=[tokens[2]], **GREEDY))])
    first = tokens.index(tokens[2])
    assert r["b"]["tokens"][0] == tokens[: first + 1]
    assert r["b"]["finish"][0] == ("stop", tokens[2])


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_siblings_share_prompt_blocks(tiny_engine, prefix_caching):
    engine = tiny_engine(block_size=4, enable_prefix_caching=prefix_caching)
    prompt = list(range(1, 30))
    r = run_to_completion(engine, [("a", prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6,
                                                                ignore_eos=True))])["a"]
    assert sorted(r["tokens"]) == [0, 1, 2] and all(len(t) == 6 for t in r["tokens"].values())
    assert len({tuple(t) for t in r["tokens"].values()}) > 1
    # siblings 1 and 2 found the 7 full prompt blocks that sibling 0 published in the same step
    assert engine.pool.num_hits == 2 * 7 * 4
    assert engine.pool.num_used_blocks == 0


def test_logprobs_and_prompt_logprobs_match_transformers(tiny_engine, tiny_model_dir):
    engine = tiny_engine()
    prompt = [3, 14, 15, 92, 65, 35, 89]
    params = SamplingParams(max_tokens=3, logprobs=4, prompt_logprobs=2, **GREEDY)
    r = run_to_completion(engine, [("a", prompt, params)])["a"]
    hf = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([prompt + r["tokens"][0]])
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids).logits[0].float(), -1)  # (L, V)
    plp = r["events"][0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(prompt)
    for pos in range(1, len(prompt)):
        assert plp[pos].token_id == prompt[pos]
        assert plp[pos].logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert [t for t, _ in plp[pos].top] == ref[pos - 1].topk(2).indices.tolist()
    for i, lp in enumerate(r["logprobs"][0]):
        row = ref[len(prompt) - 1 + i]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == row.topk(4).indices.tolist()


def test_repetition_penalty_matches_transformers(tiny_engine, tiny_model_dir):
    prompt = [7, 8, 9, 7, 8]
    r = run_to_completion(tiny_engine(), [("a", prompt, SamplingParams(max_tokens=8, repetition_penalty=1.8,
                                                                       **GREEDY))])["a"]
    hf = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([prompt])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                      repetition_penalty=1.8, pad_token_id=0)[0, len(prompt):].tolist()
    assert r["tokens"][0] == ref


def test_logit_bias_forces_a_token(tiny_engine):
    r = run_to_completion(tiny_engine(), [("a", [1, 2], SamplingParams(max_tokens=5, logit_bias={321: 100.0},
                                                                       **GREEDY))])["a"]
    assert r["tokens"][0] == [321] * 5


def test_context_length_and_bad_params_rejected(tiny_engine):
    engine = tiny_engine()
    with pytest.raises(RequestRejectedError, match="context") as e:
        engine.submit("a", [1] * 120, SamplingParams(max_tokens=9))
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestRejectedError):
        engine.submit("b", [1] * 128, SamplingParams(max_tokens=None))
    with pytest.raises(RequestRejectedError, match="empty"):
        engine.submit("c", [], SamplingParams())
    with pytest.raises(RequestRejectedError, match="top_p"):
        engine.submit("d", [1], SamplingParams(top_p=0.0))
    with pytest.raises(RequestRejectedError):
        engine.submit("e", [5000], SamplingParams())
    assert not engine.has_unfinished() and not engine.groups
    # max_tokens None: up to the context
    r = run_to_completion(engine, [("f", [1] * 100, SamplingParams(max_tokens=None, **GREEDY))])["f"]
    assert len(r["tokens"][0]) == 28 and r["finish"][0] == ("length", None)
    assert engine.pool.num_used_blocks == 0


def test_text_is_the_tokenizers_decode_even_for_broken_utf8(tiny_engine):
    """Random byte-level tokens leave incomplete UTF-8 characters: the streamed text must still
    add up to the tokenizer's own decode of the tokens, and each delta must be valid text."""
    engine = tiny_engine()
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    requests = [(f"r{i}", p, params) for i, p in enumerate(prompts(6, 1000, 2, 10, seed=13))]
    results = run_to_completion(engine, requests)
    for rid, _, _ in requests:
        r = results[rid]
        assert r["text"][0] == engine.tokenizer.decode(r["tokens"][0], skip_special_tokens=True)


def test_prompt_logprobs_reported_once_after_preemption(tiny_engine):
    engine = tiny_engine(num_kv_blocks=6, block_size=4)
    prompt = list(range(100, 110))
    engine.submit("b", list(range(200, 210)), SamplingParams(max_tokens=10, **GREEDY), priority=0)
    engine.submit("a", prompt, SamplingParams(max_tokens=10, prompt_logprobs=1, **GREEDY), priority=1)
    events = []
    while engine.has_unfinished():
        events += [o for o in engine.step() if o.request_id == "a"]
    assert engine.scheduler.num_preemptions > 0
    reported = [e.prompt_logprobs for e in events if e.prompt_logprobs is not None]
    assert len(reported) == 1
    assert [lp.token_id if lp else None for lp in reported[0]] == [None, *prompt[1:]]


def test_max_tokens_zero_scores_the_prompt_only(tiny_engine):
    r = run_to_completion(tiny_engine(), [("a", [5, 6, 7, 8], SamplingParams(max_tokens=0, prompt_logprobs=0))])["a"]
    assert r["tokens"].get(0, []) == [] and r["finish"][0] == ("length", None)
    assert len(r["events"][-1].prompt_logprobs) == 4 and r["events"][-1].num_generated_tokens == 0


def test_request_larger_than_the_kv_cache_is_refused(tiny_engine):
    engine = tiny_engine(num_kv_blocks=2, block_size=16)
    with pytest.raises(RequestRejectedError, match="needs 3 KV blocks and the cache has 2"):
        engine.submit("a", list(range(1, 30)), SamplingParams(max_tokens=10))
    assert not engine.has_unfinished()


def test_stop_strings_wait_for_min_tokens(tiny_engine):
    engine = tiny_engine()
    prompt = list(range(10, 50))
    free = run_to_completion(engine, [("f", prompt, SamplingParams(max_tokens=8, **GREEDY))])["f"]["text"][0]
    stop = free[:1]
    r = run_to_completion(engine, [("s", prompt, SamplingParams(max_tokens=8, min_tokens=5, stop=[stop], **GREEDY))])
    assert len(r["s"]["tokens"][0]) >= 5


def test_tiny_temperature_is_greedy(tiny_engine):
    prompt = [3, 1, 4, 1, 5]
    greedy = run_to_completion(tiny_engine(), [("g", prompt, SamplingParams(max_tokens=6, **GREEDY))])
    tiny = run_to_completion(tiny_engine(), [("t", prompt, SamplingParams(max_tokens=6, temperature=1e-30,
                                                                          ignore_eos=True))])
    assert tiny["t"]["tokens"][0] == greedy["g"]["tokens"][0]
