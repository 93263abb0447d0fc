"""Overload (429 + Retry-After, then recovery) and SIGTERM draining, each on its own server."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.servers import API_KEY, AUTH, StreamInBackground, metric_samples, start_server

LONG = {"model": "base", "prompt": "Go", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}


def _wait_metric(url: str, name: str, value: float, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while metric_samples(url)[(name, ())] != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


def test_full_queue_answers_429_then_recovers(slow_model_dirs, tmp_path_factory):
    server = start_server(slow_model_dirs, tmp_path_factory, "overload", "--api-key", API_KEY, "--max-num-seqs", "1",
                          "--max-waiting-requests", "1")
    try:
        running = StreamInBackground(server.url, LONG)  # takes the one running slot
        assert running.started.wait(60)
        waiting = StreamInBackground(server.url, LONG)  # takes the one waiting slot
        _wait_metric(server.url, "lmservice_num_requests_waiting", 1)

        resp = httpx.post(server.url + "/v1/generate", json={"prompt": "hi", "max_tokens": 2}, headers=AUTH)
        assert resp.status_code == 429
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.json()["error"]["type"] == "rate_limit_error"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="base", prompt="hi", max_tokens=2)

        running.hang_up()  # frees the slot; the waiting request runs
        assert waiting.started.wait(60)
        waiting.hang_up()
        _wait_metric(server.url, "lmservice_num_requests_running", 0)  # both aborts processed by the engine
        ok = client.completions.create(model="base", prompt="hi", max_tokens=2, extra_body={"ignore_eos": True})
        assert ok.usage.completion_tokens == 2
        assert server.stop() == 0
    finally:
        server.stop()


def test_sigterm_drains_in_flight_requests_then_exits_0(slow_model_dirs, tmp_path_factory):
    server = start_server(slow_model_dirs, tmp_path_factory, "drain", "--api-key", API_KEY, "--drain-timeout-s", "60")
    try:
        body = {**LONG, "max_tokens": 300}  # ~5 s on this model: outlives the checks below
        stream = StreamInBackground(server.url, body)
        assert stream.started.wait(60)
        server.terminate()
        # while draining: not ready, new work refused with 503, probes still answer
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/ready").status_code != 503:
            assert time.monotonic() < deadline
        refused = httpx.post(server.url + "/v1/generate", json={"prompt": "hi"}, headers=AUTH)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(server.url + "/health").status_code == 200
        stream.thread.join(60)
        assert stream.finish_reason() == "length"  # the in-flight request ran to its end
        assert stream.chunks[-1]["usage"]["completion_tokens"] == body["max_tokens"]
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def test_sigterm_aborts_what_outlives_the_grace_period(slow_model_dirs, tmp_path_factory):
    server = start_server(slow_model_dirs, tmp_path_factory, "drain_timeout", "--api-key", API_KEY,
                          "--drain-timeout-s", "0.2", "--max-num-seqs", "1")
    try:
        stream = StreamInBackground(server.url, LONG)
        assert stream.started.wait(60)
        server.terminate()
        stream.thread.join(30)
        assert stream.finish_reason() == "abort"
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def test_second_sigterm_aborts_every_request_and_exits_at_once(slow_model_dirs, tmp_path_factory):
    server = start_server(slow_model_dirs, tmp_path_factory, "drain_forced", "--api-key", API_KEY,
                          "--drain-timeout-s", "60")
    try:
        stream = StreamInBackground(server.url, LONG)
        assert stream.started.wait(60)
        server.terminate()
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/ready").status_code != 503:  # draining: the first SIGTERM was seen
            assert time.monotonic() < deadline
        start = time.monotonic()
        server.terminate()
        rc = server.proc.wait(30)
        assert time.monotonic() - start < 3.0
        assert rc == 1  # forced: not a clean drain
        stream.thread.join(10)
        assert stream.finish_reason() == "abort" and stream.done  # the stream still ended properly
    finally:
        server.stop()


def test_unloadable_model_is_one_clear_line_and_exit_1(tmp_path):
    import subprocess
    import sys

    from tests.servers import ROOT

    proc = subprocess.run([sys.executable, "-m", "lmservice.cli", "serve", "--model", str(tmp_path / "missing")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    errors = [json.loads(line) for line in proc.stderr.splitlines() if '"level": "error"' in line]
    assert len(errors) == 1 and "model directory not found" in errors[0]["error"]


def test_sigint_aborts_quietly_and_fast(slow_model_dirs, tmp_path_factory):
    import signal

    server = start_server(slow_model_dirs, tmp_path_factory, "sigint", "--api-key", API_KEY,
                          "--drain-timeout-s", "60")
    try:
        stream = StreamInBackground(server.url, LONG)
        assert stream.started.wait(60)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        rc = server.proc.wait(30)
        print(f"SIGINT to exit: {time.monotonic() - start:.2f} s")
        assert time.monotonic() - start < 3.0  # no grace period, unlike SIGTERM's drain
        assert rc == 1
        stream.thread.join(10)
        assert stream.finish_reason() == "abort" and stream.done
        records = server.log_records()
        assert not [r for r in records if r["level"] == "error"], [r["msg"][:300] for r in records
                                                                   if r["level"] == "error"]
        assert any(r["msg"] == "Application shutdown complete." for r in records)  # the lifespan ran its end
    finally:
        server.stop()


def test_busy_port_fails_before_the_model_loads(tmp_path):
    import socket
    import subprocess
    import sys

    from tests.servers import ROOT

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        # The model directory does not exist either: the port is looked at first.
        proc = subprocess.run([sys.executable, "-m", "lmservice.cli", "serve", "--model", str(tmp_path / "missing"),
                               "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    errors = [json.loads(line) for line in proc.stderr.splitlines() if '"level": "error"' in line]
    assert len(errors) == 1 and errors[0]["msg"] == "cannot listen" and errors[0]["port"] == port, proc.stderr[-800:]
    print(f"busy port found after {time.monotonic() - start:.2f} s")
