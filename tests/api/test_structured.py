"""Structured output over HTTP with the official openai client: response_format on chat and completions,
vLLM's structured_outputs (extra_body) and on /v1/generate, streaming, and 400s for bad specs. The shared
server's model has random weights: only the grammar makes the output valid."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                           "temp": {"type": "integer", "minimum": -50, "maximum": 50},
                                           "tags": {"type": "array", "items": {"enum": ["sun", "rain"]},
                                                    "maxItems": 2},
                                           "wind": {"type": "object", "properties": {
                                               "dir": {"enum": ["N", "S", "E", "W"]},
                                               "kmh": {"type": "integer", "minimum": 0, "maximum": 200}},
                                               "required": ["dir"], "additionalProperties": False}},
          "required": ["city", "temp", "tags", "wind"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}


def test_chat_response_format_json_schema_validates_over_seeds(client):
    for seed in range(4):
        resp = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "weather?"}],
                                              response_format=RESPONSE_FORMAT, seed=seed, temperature=1.0,
                                              max_tokens=120, n=2)
        for choice in resp.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_completions_structured_outputs_choice_and_streamed_regex(client):
    choices = ["yes", "no", "maybe"]
    resp = client.completions.create(model="base", prompt="answer:", max_tokens=20, temperature=1.0, seed=1, n=3,
                                     extra_body={"structured_outputs": {"choice": choices}})
    assert all(c.text in choices and c.finish_reason == "stop" for c in resp.choices)
    stream = client.completions.create(model="tr", prompt="phone:", max_tokens=30, stream=True, temperature=1.0,
                                       seed=2, extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", text) and chunks[-1].choices[0].finish_reason == "stop"


def test_native_generate_takes_structured_outputs_and_json_object(http):
    body = http.post("/v1/generate", json={"prompt": "x", "max_tokens": 100, "temperature": 0,
                                           "structured_outputs": {"json": SCHEMA}}).json()
    jsonschema.validate(json.loads(body["text"]), SCHEMA)
    cut = http.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 3,
                                             "response_format": {"type": "json_schema", "json_schema": {
                                                 "name": "w", "schema": SCHEMA}}}).json()
    assert cut["choices"][0]["finish_reason"] == "length"  # max_tokens can cut the object short
    free = http.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 30, "seed": 4,
                                              "response_format": {"type": "json_object"}}).json()
    assert free["choices"][0]["text"].startswith("{")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}}, "response_format"),
    ({"extra_body": {"structured_outputs": {"regex": "(["}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"choice": ["a"], "regex": "a"}}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"regex": "a"}}},
     "response_format"),
])
def test_bad_specs_are_400s(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                       **extra)
    assert e.value.body["param"] == param
