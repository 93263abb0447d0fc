"""A client that goes away aborts its request: the engine's used KV blocks return to idle (0)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.servers import API_KEY, wait_kv_idle

MAX_TOKENS = 1000  # ~all of the 1024 context: far longer than the tests wait
LONG = {"model": "base", "prompt": "Go", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


def access_record(server, request_id: str, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for rec in server.log_records():
            if rec.get("request_id") == request_id and rec.get("msg") == "request":
                return rec
        time.sleep(0.1)
    raise AssertionError(f"no access log line for {request_id}")


def kv_busy(server) -> None:
    """Wait until the engine holds blocks (the request is running)."""
    from tests.servers import metric_samples

    deadline = time.monotonic() + 30
    while metric_samples(server.url)[("lmservice_kv_cache_usage_perc", ())] == 0.0:
        assert time.monotonic() < deadline, "request never started"
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_kv_blocks(server):
    assert wait_kv_idle(server.url) == 0.0
    headers = {"Authorization": f"Bearer {API_KEY}", "X-Request-ID": "disconnect-stream"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c, \
            c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(6):  # a few events in, then hang up
            next(lines)
    assert wait_kv_idle(server.url, timeout_s=5) == 0.0
    rec = access_record(server, "disconnect-stream")
    assert 0 < rec["completion_tokens"] < MAX_TOKENS  # aborted, not run to the end


def test_disconnect_of_non_streaming_request_frees_kv_blocks(server):
    assert wait_kv_idle(server.url) == 0.0
    headers = {"Authorization": f"Bearer {API_KEY}", "X-Request-ID": "disconnect-plain"}
    with httpx.Client(base_url=server.url, headers=headers) as c, pytest.raises(httpx.ReadTimeout):
        # the client times out and closes the connection while the server is still generating (the whole
        # request takes ~0.35 s on the tiny model with the C kernels: the client leaves well before that)
        c.post("/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=0.1))
    assert wait_kv_idle(server.url, timeout_s=5) == 0.0
    rec = access_record(server, "disconnect-plain")
    assert rec["status"] == 499
    assert rec["completion_tokens"] < MAX_TOKENS
