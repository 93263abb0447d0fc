"""lmservice/serving/sampling.py: request fields -> SamplingParams, from the one list of sampling fields."""

from __future__ import annotations

import dataclasses

import pytest

from lmservice.api.schemas.common import SamplingFields
from lmservice.engine.outputs import RequestRejectedError
from lmservice.engine.sampling_params import SAMPLING_FIELDS, SamplingParams
from lmservice.serving.sampling import beam_width, sampling_params

GIVEN = {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "presence_penalty": 0.2,
         "frequency_penalty": 0.3, "repetition_penalty": 1.1, "logit_bias": {"3": -100}, "seed": 4,
         "stop": "\n", "stop_token_ids": [2], "min_tokens": 1, "ignore_eos": True, "length_penalty": 0.5,
         "early_stopping": "never"}


def test_every_sampling_field_is_a_sampling_param_and_a_request_field():
    assert set(GIVEN) == set(SAMPLING_FIELDS)  # this test sets every one of them
    assert set(SAMPLING_FIELDS) <= {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(SamplingFields.model_fields) == set(SAMPLING_FIELDS) | {"response_format", "structured_outputs"}


def test_each_field_reaches_sampling_params_in_the_engines_shape():
    params = sampling_params(GIVEN, default_max_tokens=16, n=2)
    expected = {**GIVEN, "logit_bias": {3: -100.0}, "stop": ["\n"]}
    assert {name: getattr(params, name) for name in SAMPLING_FIELDS} == expected
    assert params.n == 2


def test_a_request_that_sets_nothing_gets_the_engines_defaults():
    """The schema's defaults (null where JSON may say null) map to SamplingParams' own."""
    body = SamplingFields().model_dump()
    assert sampling_params(body, default_max_tokens=16) == SamplingParams()
    assert sampling_params(body, default_max_tokens=None).max_tokens is None  # the endpoint's default


def test_shapes_json_allows_but_the_engine_does_not_are_refused_by_name():
    with pytest.raises(RequestRejectedError, match="stop"):
        sampling_params({"stop": 3}, default_max_tokens=16)
    with pytest.raises(RequestRejectedError, match="logit_bias"):
        sampling_params({"logit_bias": {"a": 1}}, default_max_tokens=16)


def test_beam_search_is_greedy_unless_a_temperature_is_given():
    assert sampling_params({}, default_max_tokens=16, num_beams=3).temperature == 0.0
    assert sampling_params({"use_beam_search": True}, default_max_tokens=16).temperature == 0.0
    assert sampling_params({"temperature": 0.5}, default_max_tokens=16, num_beams=3).temperature == 0.5
    assert sampling_params({}, default_max_tokens=16).temperature == 1.0


def test_beam_width_from_vllms_fields():
    assert beam_width(True, None, 3) == 3 and beam_width(True, 5, 3) == 5
    assert beam_width(False, None, 2) == 1 and beam_width(False, 1, 2) == 1
    with pytest.raises(RequestRejectedError, match="best_of"):
        beam_width(False, 4, 1)
