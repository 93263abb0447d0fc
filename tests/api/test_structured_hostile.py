"""Structured-output specs a hostile client sends: every failure is the request's own 400 with a short
message (never a 500, never llguidance's parser state), on generate, completions and chat alike, while an
innocent stream beside them is unchanged and /health answers; and a hypothesis fuzz of spec shapes."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.bystander import Bystander, innocent_text
from tests.servers import AUTH, sse_events

REF_CYCLE = {"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"]}},
             "$ref": "#/$defs/n"}
DOUBLING = "start: r0\n" + "".join(f"r{i}: r{i + 1} r{i + 1}\n" for i in range(40)) + 'r40: "z"\n'
# Passes the compile-time walk (12 free choices first), then breaks the parser's limits while decoding.
LATE_DOUBLING = 'start: ' + "x " * 12 + 'r0\nx: "a" | "b"\n' + DOUBLING.split("\n", 1)[1]

HOSTILE = {
    "deep json string": ({"structured_outputs": {"json": "[" * 5000}}, "structured_outputs"),
    "deep json object": ({"structured_outputs": {"json": json.loads('{"a":' * 300 + "1" + "}" * 300)}},
                         "structured_outputs"),
    "$ref cycle with required": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": REF_CYCLE}}}, "response_format"),
    "doubling grammar": ({"structured_outputs": {"grammar": DOUBLING}}, "structured_outputs"),
    "false schema": ({"structured_outputs": {"json": False}}, "structured_outputs"),
}
ENDPOINTS = {"/v1/generate": {"prompt": "x"}, "/v1/completions": {"model": "base", "prompt": "x"},
             "/v1/chat/completions": {"model": "base", "messages": [{"role": "user", "content": "x"}]}}


def _assert_short_error(error: dict, param: str) -> None:
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    message = error["message"]
    assert "\n" not in message and "<state>" not in message and len(message) < 400, message


@pytest.fixture(scope="module")
def alone(server) -> str:
    return innocent_text(server.url)


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_hostile_specs_are_short_400s_beside_an_innocent_stream(server, alone, path):
    with Bystander(server.url, alone), httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
        for name, (fields, param) in HOSTILE.items():
            for stream in (False, True):
                resp = http.post(path, json={**ENDPOINTS[path], "max_tokens": 20, "stream": stream, **fields})
                assert resp.status_code == 400, (name, stream, resp.text[:300])
                _assert_short_error(resp.json()["error"], param)


def test_a_spec_failing_while_decoding_is_a_400_or_an_error_event(http):
    body = {"prompt": "x", "max_tokens": 40, "structured_outputs": {"grammar": LATE_DOUBLING}}
    resp = http.post("/v1/generate", json=body)
    assert resp.status_code == 400
    _assert_short_error(resp.json()["error"], "structured_outputs")
    assert "while generating" in resp.json()["error"]["message"]
    streamed = http.post("/v1/completions", json={**body, "model": "base", "stream": True})
    assert streamed.status_code == 200  # the headers went out before the failure
    events = sse_events(streamed.content)
    assert events[-1] == "[DONE]"
    _assert_short_error(json.loads(events[-2])["error"], "structured_outputs")


def test_json_true_is_the_schema_any_value_matches(http):
    for spec in (True, "true", {}):
        resp = http.post("/v1/generate", json={"prompt": "x", "max_tokens": 6, "structured_outputs": {"json": spec}})
        assert resp.status_code == 200, resp.text


# ---- the fuzz: shapes of response_format / structured_outputs; never a 5xx

names = st.text(alphabet="abc$#/", min_size=1, max_size=4)
leaf_schemas = st.one_of(
    st.booleans(), st.sampled_from([{"type": t} for t in ("string", "integer", "number", "object", "array", "null")]),
    st.builds(lambda n: {"enum": [f"v{i}" for i in range(n)]}, st.integers(0, 3000)),
    st.builds(lambda p: {"type": "string", "pattern": p}, st.text(alphabet="a(|)*+?[]{}\\.1,", max_size=8)),
    st.builds(lambda r: {"$ref": r}, st.sampled_from(["#", "#/$defs/n", "#/nope", "x.json"])),
)
schemas = st.recursive(leaf_schemas, lambda inner: st.one_of(
    st.builds(lambda i: {"type": "array", "items": i}, inner),
    st.builds(lambda p, r: {"type": "object", "properties": p, "required": r},
              st.dictionaries(names, inner, max_size=3), st.lists(names, max_size=2)),
    st.builds(lambda d, r: {"$defs": {"n": d}, "$ref": r}, inner, st.sampled_from(["#/$defs/n", "#"])),
    st.builds(lambda xs: {"anyOf": xs}, st.lists(inner, max_size=3)),
), max_leaves=6)
nested_text = st.builds(lambda open_, depth: open_ * depth, st.sampled_from(["[", "{", '{"a":', "[[{"]),
                        st.integers(1, 20000))
specs = st.one_of(
    st.builds(lambda s: {"structured_outputs": {"json": s}}, st.one_of(schemas, nested_text, st.text(max_size=8),
                                                                    st.builds(json.dumps, schemas))),
    st.builds(lambda s: {"response_format": {"type": "json_schema", "json_schema": {"name": "f", "schema": s}}},
              st.one_of(schemas, st.text(max_size=4), st.none())),
    st.builds(lambda r: {"structured_outputs": {"regex": r}}, st.text(alphabet="a(|)*+?[]{}\\.1,^$", max_size=12)),
    st.builds(lambda c: {"structured_outputs": {"choice": c}},
              st.one_of(st.lists(st.text(max_size=3), max_size=4),
                        st.builds(lambda n: [f"c{i}" for i in range(n)], st.integers(0, 5000)))),
    st.builds(lambda g: {"structured_outputs": {"grammar": g}}, st.one_of(
        st.text(max_size=12), st.builds(lambda n: "start: r0\n" + "".join(
            f"r{i}: r{i + 1} r{i + 1}\n" for i in range(n)) + f'r{n}: "z"\n', st.integers(1, 45)))),
    st.builds(lambda t: {"response_format": {"type": t}}, st.one_of(st.text(max_size=4), st.sampled_from(
        ["text", "json_object", "json_schema"]))),
)


def test_fuzzed_specs_never_get_a_5xx(server):
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(spec=specs, path=st.sampled_from(list(ENDPOINTS)), stream=st.booleans())
    def one(spec, path, stream):
        body = {**ENDPOINTS[path], "max_tokens": 8, "stream": stream, **spec}
        with httpx.Client(timeout=60) as client:
            resp = client.post(server.url + path, json=body, headers=AUTH)
            text = resp.read()
        assert resp.status_code < 500, (spec, text[:300])
        if resp.status_code >= 400:
            assert "<state>" not in resp.json()["error"]["message"]
        elif stream:
            assert text.endswith(b"data: [DONE]\n\n") and b'"type":"internal_error"' not in text, (spec, text[-300:])

    one()
