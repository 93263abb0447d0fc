"""Every sampling field is range-checked in one place, with the limit named in the error."""

from __future__ import annotations

import math

import pytest

from lmservice.engine.sampling_params import RequestLimits, SamplingParams

VOCAB = 1000
LIMITS = RequestLimits(max_n=4, max_logit_bias=3, max_stop=2, max_stop_length=5)


@pytest.mark.parametrize(("fields", "param", "says"), [
    ({"n": 5}, "n", "--max-n"),
    ({"n": 0}, "n", "between 1 and 4"),
    ({"max_tokens": -1}, "max_tokens", "non-negative"),
    ({"min_tokens": 9, "max_tokens": 8}, "min_tokens", "max_tokens"),
    ({"temperature": math.nan}, "temperature", "[0, 100]"),
    ({"temperature": math.inf}, "temperature", "[0, 100]"),
    ({"top_k": 10**20}, "top_k", f"vocabulary size {VOCAB}"),
    ({"top_k": VOCAB + 1}, "top_k", f"vocabulary size {VOCAB}"),
    ({"top_k": -2}, "top_k", "-1, 0 (off)"),
    ({"top_p": math.inf}, "top_p", "(0, 1]"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"min_p": math.nan}, "min_p", "[0, 1]"),
    ({"repetition_penalty": math.nan}, "repetition_penalty", "(0, 100]"),
    ({"repetition_penalty": math.inf}, "repetition_penalty", "(0, 100]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "(0, 100]"),
    ({"presence_penalty": -math.inf}, "presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "[-2, 2]"),
    ({"logprobs": 21}, "logprobs", "between 0 and 20"),
    ({"prompt_logprobs": -1}, "prompt_logprobs", "between 0 and 20"),
    ({"seed": 2**64}, "seed", "2^64 - 1"),
    ({"seed": -(2**63) - 1}, "seed", "-2^63"),
    ({"stop": ["a", "b", "c"]}, "stop", "--max-stop"),
    ({"stop": ["abcdef"]}, "stop", "--max-stop-length"),
    ({"stop": [""]}, "stop", "non-empty"),
    ({"stop_token_ids": [1, 2, 3]}, "stop_token_ids", "--max-stop"),
    ({"stop_token_ids": [VOCAB]}, "stop_token_ids", f"[0, {VOCAB - 1}]"),
    ({"logit_bias": {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}}, "logit_bias", "--max-logit-bias"),
    ({"logit_bias": {VOCAB: 1.0}}, "logit_bias", f"[0, {VOCAB - 1}]"),
    ({"logit_bias": {1: math.nan}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {1: 101.0}}, "logit_bias", "[-100, 100]"),
])
def test_out_of_range_fields_are_refused_naming_the_field_and_limit(fields, param, says):
    with pytest.raises(ValueError) as info:
        SamplingParams(**fields).validate(VOCAB, LIMITS)
    assert info.value.param == param
    assert str(info.value).startswith(f"{param}: ") and says in str(info.value)


@pytest.mark.parametrize("fields", [
    {"n": 4}, {"top_k": VOCAB}, {"top_k": -1}, {"seed": 2**64 - 1}, {"seed": -(2**63)},
    {"stop": ["abcde", "x"]}, {"logit_bias": {0: -100.0, 999: 100.0, 5: 0.0}}, {"max_tokens": None},
    {"logprobs": 20, "prompt_logprobs": 0}, {"temperature": 0}, {"repetition_penalty": 100.0},
])
def test_values_at_the_limits_are_accepted(fields):
    SamplingParams(**fields).validate(VOCAB, LIMITS)


def test_default_limits_apply_without_a_server():
    SamplingParams(n=128).validate(VOCAB)
    with pytest.raises(ValueError, match="--max-n"):
        SamplingParams(n=129).validate(VOCAB)
