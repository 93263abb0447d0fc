"""Random field values at every endpoint of a real server: always 2xx or 4xx in the one error shape,
never a 5xx or a dropped connection, and the server still serves afterwards (hypothesis)."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import make_gpt2_dir
from tests.servers import ADMIN_KEY, API_KEY, start_server

HEADERS = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}

# Hostile scalars: huge and negative integers, non-finite and tiny floats, strings with lone surrogates.
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 1, -1, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-300, -0.0, 1e308]),
    st.text(max_size=12), st.sampled_from(["\ud800", "a\udfffb", "", "\x00", "\n"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                      max_leaves=8)

SAMPLING = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "logit_bias", "seed", "stop", "stop_token_ids", "min_tokens", "ignore_eos"]
ENDPOINTS = {
    "/v1/generate": ({"prompt": "hi"}, [*SAMPLING, "prompt", "model", "logprobs", "stream"]),
    "/v1/completions": ({"prompt": "hi"}, [*SAMPLING, "prompt", "model", "n", "logprobs", "echo", "stream",
                                           "stream_options", "user"]),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "hi"}]},
                             [*SAMPLING, "messages", "model", "n", "logprobs", "top_logprobs",
                              "max_completion_tokens", "stream", "stream_options"]),
    "/v1/classify": ({"text": "hi"}, ["text", "model"]),
    "/v1/translate": ({"text": "hi"}, ["text", "model", "source", "target", "max_tokens", "temperature", "stream"]),
    "/v1/adapters": ({"name": "x", "path": "cls"}, ["name", "path"]),
}


@pytest.fixture(scope="module")
def fuzz_server(model_dirs, tmp_path_factory):
    """A short context (64 tokens) keeps every accepted request small; modest limits keep it quick."""
    base = make_gpt2_dir(tmp_path_factory.mktemp("fuzz_model") / "base", seed=9, vocab_size=1000, n_positions=64)
    dirs = {"base": base, "adapters": model_dirs["adapters"]}
    srv = start_server(dirs, tmp_path_factory, "fuzz", "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
                       "--max-n", "4", "--max-prompts-per-request", "4")
    yield srv
    srv.stop()


def _encode(body: dict) -> bytes:
    # NaN/Infinity as JSON's non-standard literals, lone surrogates as \\u escapes: what a client can send.
    return json.dumps(body, allow_nan=True).encode()


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_random_fields_never_get_a_5xx(fuzz_server, path):
    base, fields = ENDPOINTS[path]
    headers = {**HEADERS, "Authorization": f"Bearer {ADMIN_KEY}"} if path == "/v1/adapters" else HEADERS
    statuses = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(changes=st.dictionaries(st.sampled_from(fields), values, min_size=1, max_size=4),
           keep_base=st.booleans())
    def one(changes, keep_base):
        body = {**base, **changes} if keep_base else dict(changes)
        if path != "/v1/adapters" and "max_tokens" not in body:
            body["max_tokens"] = 4
        with httpx.Client(timeout=60) as client:
            resp = client.post(fuzz_server.url + path, content=_encode(body), headers=headers)
            text = resp.read()  # a stream, too, is read to its end
        assert resp.status_code < 500, (body, resp.status_code, text[:500])
        if resp.status_code >= 400:
            error = resp.json()["error"]
            assert error["message"] and error["type"], body
        elif resp.headers["content-type"].startswith("text/event-stream"):
            assert text.endswith(b"data: [DONE]\n\n"), (body, text[-200:])
            assert b'"type":"internal_error"' not in text, (body, text[-500:])
        statuses.append(resp.status_code)

    one()
    assert any(s >= 400 for s in statuses)  # the strategies do reach the validation
    ok = httpx.post(fuzz_server.url + "/v1/generate", headers=HEADERS, timeout=60,
                    json={"prompt": "still here", "max_tokens": 2, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(fuzz_server.url + "/health", timeout=10).status_code == 200
