"""A request that fails fails alone: its blocks are freed, its neighbours' tokens are unchanged, and the
engine goes on serving (a forward that raises, a row the sampler cannot handle, NaN logits, a detokenizer
error); aborts free blocks at once."""

from __future__ import annotations

from lmservice.engine.sampling_params import SamplingParams
from tests.helpers import run_to_completion

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_abort_mid_generation_frees_blocks(tiny_engine):
    engine = tiny_engine()
    engine.submit("a", list(range(1, 40)), SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    engine.step()
    assert engine.pool.num_used_blocks > 0
    out = engine.abort("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.pool.num_used_blocks == 0 and not engine.has_unfinished()


def test_failing_request_fails_alone(tiny_engine):
    engine = tiny_engine()
    engine.submit("good", [1, 2, 3], SamplingParams(max_tokens=4, **GREEDY))
    engine.submit("bad", [4, 5, 6], SamplingParams(max_tokens=4, **GREEDY))
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
    engine.submit("good", [1, 2, 3], SamplingParams(max_tokens=6, **GREEDY))
    engine.submit("bad", [4, 5, 6], SamplingParams(max_tokens=6, n=2, **GREEDY))

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
        engine.submit(rid, ids, params)
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
    engine.submit("a", [1, 2, 3], SamplingParams(max_tokens=3, **GREEDY))
    out = [o for _ in range(3) for o in engine.step()]
    assert out[-1].finished and "non-finite" in out[-1].error
    assert not engine.has_unfinished() and engine.pool.num_used_blocks == 0


def test_failed_step_leaves_no_unwritten_blocks_in_the_prefix_cache(tiny_engine):
    prompt = list(range(10, 50))
    params = SamplingParams(max_tokens=4, logprobs=0, **GREEDY)
    clean = run_to_completion(tiny_engine(), [("ref", prompt, params)])["ref"]
    engine = tiny_engine()
    execute, calls = engine.runner.execute, []

    def flaky(sched, lora=None):  # the first forward fails (e.g. out of memory) after blocks were published
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        return execute(sched, lora)

    engine.runner.execute = flaky
    failed = run_to_completion(engine, [("a", prompt, params)])["a"]
    assert failed["events"][-1].error
    again = run_to_completion(engine, [("b", prompt, params)])["b"]
    assert again["events"][-1].num_cached_tokens == 0
    assert [lp.logprob for lp in again["logprobs"][0]] == [lp.logprob for lp in clean["logprobs"][0]]
