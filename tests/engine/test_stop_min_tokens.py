"""A stop string and min_tokens at the boundary: a stop string completed exactly by the min_tokens-th token
stops the request there; one completed before it is passed over (tiny engine, greedy with a repetition
penalty: an output whose prefixes are whole characters and do not recur)."""

from __future__ import annotations

import pytest

from lmservice.engine.sampling_params import SamplingParams
from tests.helpers import run_to_completion

VARIED = dict(temperature=0.0, repetition_penalty=5.0, ignore_eos=True)
PROMPT = list(range(10, 50))


def _texts_by_length(engine, num_tokens: int) -> list[str]:
    """The output's text after each of its first `num_tokens` tokens."""
    return [run_to_completion(engine, [(f"p{n}", PROMPT, SamplingParams(max_tokens=n, **VARIED))])[f"p{n}"]["text"][0]
            for n in range(1, num_tokens + 1)]


@pytest.mark.parametrize("min_tokens", [1, 3, 5])
def test_a_stop_string_completed_by_the_min_tokens_th_token_stops_there(tiny_engine, min_tokens):
    engine = tiny_engine()
    texts = _texts_by_length(engine, min_tokens)
    stop = texts[-1]  # the whole text so far: it is complete at the min_tokens-th token, and not before
    assert stop and "\ufffd" not in stop and all(t != stop for t in texts[:-1])
    r = run_to_completion(engine, [("s", PROMPT, SamplingParams(max_tokens=20, min_tokens=min_tokens, stop=[stop],
                                                                **VARIED))])["s"]
    assert len(r["tokens"][0]) == min_tokens and r["finish"][0] == ("stop", stop) and r["text"][0] == ""


def test_a_stop_string_completed_before_min_tokens_is_passed_over(tiny_engine):
    engine = tiny_engine()
    texts = _texts_by_length(engine, 6)
    assert texts[1] not in texts[5][len(texts[1]):]  # it does not complete again later
    r = run_to_completion(engine, [("s", PROMPT, SamplingParams(max_tokens=6, min_tokens=3, stop=[texts[1]],
                                                                **VARIED))])["s"]
    assert len(r["tokens"][0]) >= 3 and r["text"][0].startswith(texts[1])
