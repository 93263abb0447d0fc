"""Per-request behaviour through the engine: sampling, stops, limits, n, logprobs, failures."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from service.engine.outputs import RequestRejectedError
from service.engine.sampling_params import SamplingParams
from tests.engine.conftest import run_to_completion
from tests.helpers import prompts

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
        engine.add_request("a", [1] * 120, SamplingParams(max_tokens=9))
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestRejectedError):
        engine.add_request("b", [1] * 128, SamplingParams(max_tokens=None))
    with pytest.raises(RequestRejectedError, match="empty"):
        engine.add_request("c", [], SamplingParams())
    with pytest.raises(RequestRejectedError, match="top_p"):
        engine.add_request("d", [1], SamplingParams(top_p=0.0))
    with pytest.raises(RequestRejectedError):
        engine.add_request("e", [5000], SamplingParams())
    assert not engine.has_unfinished() and not engine.groups
    # max_tokens None: up to the context
    r = run_to_completion(engine, [("f", [1] * 100, SamplingParams(max_tokens=None, **GREEDY))])["f"]
    assert len(r["tokens"][0]) == 28 and r["finish"][0] == ("length", None)
    assert engine.pool.num_used_blocks == 0


def test_abort_mid_generation_frees_blocks(tiny_engine):
    engine = tiny_engine()
    engine.add_request("a", list(range(1, 40)), SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    engine.step()
    assert engine.pool.num_used_blocks > 0
    out = engine.abort("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.pool.num_used_blocks == 0 and not engine.has_unfinished()


def test_failing_request_fails_alone(tiny_engine):
    engine = tiny_engine()
    engine.add_request("good", [1, 2, 3], SamplingParams(max_tokens=4, **GREEDY))
    engine.add_request("bad", [4, 5, 6], SamplingParams(max_tokens=4, **GREEDY))
    engine.groups["bad"].detoks[0].add_token = lambda token_id, **kw: 1 / 0  # breaks after validation
    events: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            events.setdefault(out.request_id, []).append(out)
    bad, good = events["bad"][-1], events["good"][-1]
    assert bad.finished and "ZeroDivisionError" in bad.error and bad.outputs[0].finish_reason == "error"
    assert good.finished and good.error is None
    assert sum(len(c.token_ids) for e in events["good"] for c in e.outputs) == 4
    assert engine.pool.num_used_blocks == 0


def test_a_detokenizer_that_raises_while_flushing_text_fails_only_its_request(tiny_engine):
    """take_delta runs while the step's outputs are collected, after every row was updated: a failure
    there must end its own request with an error, not the step (which would fail every request)."""
    alone = run_to_completion(tiny_engine(), [("good", [1, 2, 3], SamplingParams(max_tokens=6, **GREEDY))])
    engine = tiny_engine()
    engine.add_request("good", [1, 2, 3], SamplingParams(max_tokens=6, **GREEDY))
    engine.add_request("bad", [4, 5, 6], SamplingParams(max_tokens=6, n=2, **GREEDY))

    def broken(finished):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a bad byte")

    engine.groups["bad"].detoks[1].take_delta = broken
    tokens, last = {"good": [], "bad": []}, {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += [t for c in out.outputs for t in c.token_ids]
            last[out.request_id] = out
    assert last["bad"].finished and "UnicodeDecodeError" in last["bad"].error
    assert {c.finish_reason for c in last["bad"].outputs} == {"error"}
    assert last["good"].error is None and tokens["good"] == alone["good"]["tokens"][0]
    assert engine.pool.num_used_blocks == 0


def test_a_row_the_sampler_cannot_handle_fails_alone_and_its_batch_is_unchanged(tiny_engine):
    """A value past validation (set after it, as a bug elsewhere could) breaks the batched sampling
    pass: only its request fails; greedy and seeded neighbours get exactly their tokens alone."""
    innocent = [("greedy", [1, 2, 3], SamplingParams(max_tokens=8, **GREEDY)),
                ("seeded", [4, 5], SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True))]
    alone = {rid: run_to_completion(tiny_engine(), [(rid, ids, p)])[rid]["tokens"][0] for rid, ids, p in innocent}
    engine = tiny_engine()
    hostile = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.5, ignore_eos=True)
    for rid, ids, params in [*innocent, ("hostile", [7, 8, 9], hostile)]:
        engine.add_request(rid, ids, params)
    hostile.top_k = 10**20  # torch.tensor(top_k) overflows inside the batched pass
    tokens: dict[str, list[int]] = {rid: [] for rid in ["greedy", "seeded", "hostile"]}
    last = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += [t for c in out.outputs for t in c.token_ids]
            last[out.request_id] = out
    assert "sampling failed" in last["hostile"].error and tokens["hostile"] == []
    assert {rid: tokens[rid] for rid in alone} == alone
    assert last["greedy"].error is None and last["seeded"].error is None
    assert engine.pool.num_used_blocks == 0


def test_non_finite_logits_fail_only_their_request(tiny_engine):
    engine = tiny_engine()
    runner = engine.runner
    compute = runner.model.compute_logits

    def poisoned(hidden):
        logits = compute(hidden)
        logits[0] = float("nan")  # row 0 of every sampling pass
        return logits

    runner.model.compute_logits = poisoned
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=3, **GREEDY))
    out = [o for _ in range(3) for o in engine.step()]
    assert out[-1].finished and "non-finite" in out[-1].error
    assert not engine.has_unfinished() and engine.pool.num_used_blocks == 0


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
