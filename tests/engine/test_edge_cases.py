"""Edge cases found in review: each was a real defect, each test failed before its fix."""

from __future__ import annotations

import asyncio

import pytest

from service.engine.async_engine import AsyncEngine
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.engine import EngineConfig
from service.engine.outputs import QueueFullError, RequestRejectedError
from service.engine.sampling_params import SamplingParams
from service.engine.stop_strings import StopStrings
from service.model.loader import load_model
from tests.engine.conftest import run_to_completion

GREEDY = dict(temperature=0.0, ignore_eos=True)


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


def test_prompt_logprobs_reported_once_after_preemption(tiny_engine):
    engine = tiny_engine(num_kv_blocks=6, block_size=4)
    prompt = list(range(100, 110))
    engine.add_request("b", list(range(200, 210)), SamplingParams(max_tokens=10, **GREEDY), priority=0)
    engine.add_request("a", prompt, SamplingParams(max_tokens=10, prompt_logprobs=1, **GREEDY), priority=1)
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
        engine.add_request("a", list(range(1, 30)), SamplingParams(max_tokens=10))
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


def test_stop_string_in_bytes_flushed_at_the_end(tiny_engine):
    tokenizer = tiny_engine().tokenizer
    detok = IncrementalDetokenizer(tokenizer, StopStrings(["0"]), False, True)
    # two stray bytes, then the token '0' + a lead byte: all held back until the end
    held = [t for t in range(256, 1000) if tokenizer.convert_ids_to_tokens(t) in ("0Ã", "0Ä", "0Å")][:1]
    assert held, "the test tokenizer has a '0' + lead-byte token"
    for t in [250, 180, *held]:
        assert detok.add_token(t) is None
    assert "0" not in detok.take_delta(finished=True)


def test_async_admission_counts_queued_requests_and_answers_queue_full(tiny_model_dir):
    async def scenario():
        engine = AsyncEngine.from_loaded(load_model(tiny_model_dir, "cpu", "float32"),
                                         EngineConfig(num_kv_blocks=64, max_waiting_requests=4))
        engine.start()
        params = SamplingParams(max_tokens=2, n=2, **GREEDY)
        streams = [engine.add_request("r0", [1, 2, 3], params), engine.add_request("r1", [1, 2, 3], params)]
        with pytest.raises(QueueFullError):  # same loop tick: the first two are still in the command queue
            engine.add_request("r2", [1, 2, 3], params)
        for stream in streams:
            assert [o async for o in stream][-1].finished
        await engine.shutdown()

    asyncio.run(scenario())
