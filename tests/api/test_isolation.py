"""One client cannot fail or stall another's requests: hostile inputs get a 4xx in the one error shape
while an innocent stream runs beside them, and the innocent stream's tokens are those it gets alone.

Each reproduction of the isolation issue is one row of HOSTILE; the server runs with small operator
limits so that the limits themselves are exercised (--max-n, --max-logit-bias, --max-stop, ...).
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.servers import ADMIN_KEY, API_KEY, StreamInBackground, metric_samples, start_server

AUTH = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
LIMIT_FLAGS = ("--max-n", "4", "--max-logit-bias", "64", "--max-stop", "8", "--max-stop-length", "16",
               "--max-prompts-per-request", "8", "--max-waiting-requests", "12", "--header-read-timeout-s", "1")
INNOCENT = {"model": "base", "prompt": "The quiet lake", "max_tokens": 600, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def limited(slow_model_dirs, tmp_path_factory):
    srv = start_server(slow_model_dirs, tmp_path_factory, "limits", "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
                       *LIMIT_FLAGS)
    yield srv
    srv.stop()


def raw(path: str, body: str) -> tuple[str, str]:
    """A body sent as written (NaN, 1e999 and lone surrogates are legal JSON text, not legal values)."""
    return path, body


# (what, path, body (dict or raw text), expected status, the param named in the error or None)
HOSTILE = [
    ("top_k past int64 fails only itself", "/v1/completions",
     {"model": "base", "prompt": "hi", "top_k": 10**20, "top_p": 0.5, "max_tokens": 4}, 400, "top_k"),
    ("top_k past the vocabulary", "/v1/generate", {"prompt": "hi", "top_k": 1001}, 400, "top_k"),
    ("seed of 2^64", "/v1/completions", {"model": "base", "prompt": "hi", "seed": 2**64}, 400, "seed"),
    ("n past --max-n", "/v1/completions", {"model": "base", "prompt": "hi", "n": 5}, 400, "n"),
    ("n of 10^20", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 10**20}, 400, "n"),
    ("max_tokens of 10^30", "/v1/generate", {"prompt": "hi", "max_tokens": 10**30}, 400, "max_tokens"),
    ("logprobs past 20", "/v1/completions", {"model": "base", "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("top_logprobs past 20", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("top_p of 1e999 (infinity)", *raw("/v1/completions", '{"model": "base", "prompt": "hi", "top_p": 1e999}'),
     422, "top_p"),
    ("repetition_penalty NaN", *raw("/v1/generate", '{"prompt": "hi", "repetition_penalty": NaN}'), 422,
     "repetition_penalty"),
    ("repetition_penalty Infinity", *raw("/v1/generate", '{"prompt": "hi", "repetition_penalty": Infinity}'), 422,
     "repetition_penalty"),
    ("lone surrogate: generate", *raw("/v1/generate", '{"prompt": "hi \\ud800"}'), 422, "prompt"),
    ("lone surrogate: completions", *raw("/v1/completions", '{"model": "base", "prompt": ["ok", "\\udfff"]}'),
     422, "prompt"),
    ("lone surrogate: chat", *raw("/v1/chat/completions",
                                  '{"messages": [{"role": "user", "content": "hi \\ud800"}]}'), 422, "messages"),
    ("lone surrogate: classify", *raw("/v1/classify", '{"model": "cls", "text": "hi \\ud800"}'), 422, "text"),
    ("lone surrogate: translate", *raw("/v1/translate", '{"text": ["\\ud800"]}'), 422, "text"),
    ("lone surrogate: stop", *raw("/v1/generate", '{"prompt": "hi", "stop": "\\ud800"}'), 422, "stop"),
    ("logit_bias past --max-logit-bias", "/v1/completions",
     {"model": "base", "prompt": "hi", "n": 4, "logit_bias": {str(i): 1.0 for i in range(65)}}, 400, "logit_bias"),
    ("logit_bias NaN", *raw("/v1/completions", '{"model": "base", "prompt": "hi", "logit_bias": {"3": NaN}}'),
     422, "logit_bias"),
    ("stop strings past --max-stop", "/v1/completions",
     {"model": "base", "prompt": "hi", "stop": [f"s{i}" for i in range(9)]}, 400, "stop"),
    ("stop string past --max-stop-length", "/v1/generate", {"prompt": "hi", "stop": ["x" * 17]}, 400, "stop"),
    ("prompts past --max-prompts-per-request", "/v1/completions",
     {"model": "base", "prompt": ["hi"] * 5000, "max_tokens": 1}, 400, "prompt"),
    ("texts past --max-prompts-per-request", "/v1/classify", {"model": "cls", "text": ["a"] * 9}, 400, "text"),
    ("a multi-prompt request bigger than the queue is refused whole, for good", "/v1/completions",
     {"model": "base", "prompt": ["hi"] * 8, "n": 4, "max_tokens": 1}, 400, "n"),
    ("prompt token id past the vocabulary", "/v1/completions",
     {"model": "base", "prompt": [1, 2, 10**30]}, 400, "prompt"),
]
# Heavy but within the limits: they run in the innocent stream's batches and must not change its tokens.
HEAVY_BUT_VALID = [
    ("/v1/completions", {"model": "base", "prompt": "hi", "n": 4, "max_tokens": 8, "temperature": 1.0, "seed": 3,
                         "logit_bias": {str(i): 5.0 for i in range(64)}}),
    ("/v1/completions", {"model": "base", "prompt": "hi", "n": 4, "max_tokens": 8,
                         "stop": [chr(97 + i) * 16 for i in range(8)]}),
    ("/v1/completions", {"model": "base", "prompt": ["a", "b", "c"], "max_tokens": 8, "repetition_penalty": 100.0}),
]


def _send(url: str, path: str, body) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(url + path, content=content.encode("utf-8", "surrogatepass"), headers=AUTH, timeout=60)


def test_hostile_requests_get_4xx_and_the_innocent_stream_is_unchanged(limited):
    alone = StreamInBackground(limited.url, INNOCENT)
    alone.thread.join(120)
    assert alone.finish_reason() == "length"

    innocent = StreamInBackground(limited.url, INNOCENT)
    assert innocent.started.wait(60)
    for what, path, body, status, param in HOSTILE:
        resp = _send(limited.url, path, body)
        assert resp.status_code == status, (what, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param, (what, error)
        assert error["message"], what
    for path, body in HEAVY_BUT_VALID:
        assert _send(limited.url, path, body).status_code == 200
    assert innocent.thread.is_alive(), "the innocent stream ended before the hostile requests were all sent"
    innocent.thread.join(120)
    assert innocent.finish_reason() == "length"
    assert innocent.text() == alone.text()
    # and the server still serves
    ok = _send(limited.url, "/v1/generate", {"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_request_refused_whole_never_occupies_the_queue(limited):
    """Larger than the queue's bound on its own (no wait would admit it: 400, not 429): the engine saw none of its
    prompts: nothing waiting, nothing running, and others are admitted."""
    resp = _send(limited.url, "/v1/completions", {"model": "base", "prompt": ["hi"] * 8, "n": 4, "max_tokens": 1})
    assert resp.status_code == 400 and "--max-waiting-requests" in resp.json()["error"]["message"]
    assert "retry-after" not in resp.headers
    samples = metric_samples(limited.url)
    assert samples[("lmservice_num_requests_waiting", ())] == 0
    assert samples[("lmservice_num_requests_running", ())] == 0
    within = _send(limited.url, "/v1/completions", {"model": "base", "prompt": ["hi"] * 3, "n": 4, "max_tokens": 1})
    assert within.status_code == 200 and len(within.json()["choices"]) == 12


def test_limits_at_their_bounds_are_served(limited):
    body = {"model": "base", "prompt": ["a"] * 3, "n": 4, "max_tokens": 2, "temperature": 0.7, "seed": 2**64 - 1,
            "logit_bias": {str(i): -1.0 for i in range(64)}, "stop": ["z" * 16] * 8, "logprobs": 20}
    resp = _send(limited.url, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"]) == 12


def test_adapter_names_with_a_trailing_newline_are_refused(limited):
    resp = httpx.post(limited.url + "/v1/adapters", json={"name": "cls2\n", "path": "cls"},
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert resp.status_code == 400 and "adapter name" in resp.json()["error"]["message"]


def test_half_sent_request_headers_are_closed_after_the_header_timeout(limited):
    port = int(limited.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
        slow.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        start = time.monotonic()
        assert slow.recv(1024) == b""  # closed by the server, with no response
        assert idle.recv(1024) == b""  # a connection that never sent a byte too
        assert time.monotonic() - start < 5
    # a complete request on a fresh connection is answered (negative control)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as ok:
        ok.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.recv(1024).startswith(b"HTTP/1.1 200")


def test_a_stream_the_client_drops_is_counted_as_499(limited):
    key = ("lmservice_requests_total", (("endpoint", "/v1/completions"), ("model", "base"), ("status", "499")))
    before = metric_samples(limited.url).get(key, 0.0)
    stream = StreamInBackground(limited.url, INNOCENT)
    assert stream.started.wait(60)
    stream.hang_up()
    deadline = time.monotonic() + 30
    while metric_samples(limited.url).get(key, 0.0) != before + 1:
        assert time.monotonic() < deadline, "the dropped stream was not counted as 499"
        time.sleep(0.05)
