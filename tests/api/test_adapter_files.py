"""Adapter files an operator (or an attacker with write access to the adapters dir) can get wrong, against a real
`lmservice serve`: the start-up scan skips each bad adapter with one log line and counts it; POST /v1/adapters
answers each with a 400 naming the file and the reason, in bounded time, while an innocent stream keeps its
exact text and /health keeps answering; a huge path is refused before the file system is touched and never
echoed. Each refusal sits next to an innocent load that succeeds."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from tests.adapter_files import REDOS_KEY, write_adapter, write_hostile_adapters
from tests.servers import ADMIN_KEY, API_KEY, AUTH, metric_samples, start_server

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
FAILURES = ("lmservice_adapter_load_failures_total", ())
INNOCENT = {"model": "base", "prompt": "the cat sat on", "max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def hostile(model_dirs, tmp_path_factory):
    """A server whose adapters dir holds the two good adapters, one whose rank_pattern key backtracks under `re`
    (matches nothing: it loads), and the hostile ones of tests/adapter_files.py."""
    root = tmp_path_factory.mktemp("adapter_files")
    adapters = root / "adapters"
    for name in ("cls", "tr"):
        shutil.copytree(model_dirs["adapters"] / name, adapters / name)
    write_adapter(adapters / "redos", n_embd=64, rank_pattern={REDOS_KEY: 4})
    reasons = write_hostile_adapters(adapters, root / "outside", n_embd=64)
    server = start_server({"base": model_dirs["base"], "adapters": adapters}, tmp_path_factory, "adapter_files",
                          "--api-key", API_KEY, "--admin-key", ADMIN_KEY)
    yield server, reasons
    server.stop()


class HealthProbe:
    """/health every 50 ms in a thread, recording each latency."""

    def __init__(self, url: str) -> None:
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()
        while not self.latencies:  # probing before the work starts
            time.sleep(0.01)

    def _run(self, url: str) -> None:
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set():
                start = time.monotonic()
                assert c.get(url + "/health").status_code == 200
                self.latencies.append(time.monotonic() - start)
                time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(30)
        return max(self.latencies)


def innocent_text(url: str) -> str:
    resp = httpx.post(url + "/v1/completions", json=INNOCENT, headers=AUTH, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def test_the_scan_loads_the_good_adapters_and_skips_each_bad_one_with_a_log_line(hostile):
    server, reasons = hostile
    models = httpx.get(server.url + "/v1/models", headers=AUTH, timeout=30).json()["data"]
    assert sorted(m["id"] for m in models) == ["base", "cls", "redos", "tr"]
    skipped = [r["msg"] for r in server.log_records() if " not loaded: " in r.get("msg", "")]
    assert len(skipped) == len(reasons), skipped
    for name, reason in reasons.items():
        [line] = [s for s in skipped if f"/adapters/{name}" in s]
        assert reason in line and len(line) < 500, line
    assert metric_samples(server.url)[FAILURES] == len(reasons)
    classify = httpx.post(server.url + "/v1/classify", json={"model": "cls", "text": "a b"}, headers=AUTH, timeout=60)
    assert classify.status_code == 200, classify.text


def test_hostile_adapter_files_are_400s_in_bounded_time_beside_innocent_work(hostile):
    server, reasons = hostile
    alone = innocent_text(server.url)
    before = metric_samples(server.url)[FAILURES]
    probe = HealthProbe(server.url)
    texts: list[str] = []
    innocent = threading.Thread(target=lambda: texts.extend(innocent_text(server.url) for _ in range(3)))
    innocent.start()
    try:
        for name, reason in reasons.items():
            start = time.monotonic()
            resp = httpx.post(server.url + "/v1/adapters", json={"name": f"post-{name}", "path": name},
                              headers=ADMIN, timeout=30)
            assert time.monotonic() - start < 2.0, name
            assert resp.status_code == 400, resp.text
            message = resp.json()["error"]["message"]
            assert reason in message and len(message) < 500, message
            assert "root:" not in message  # /etc/passwd was not read into the answer
        start = time.monotonic()
        resp = httpx.post(server.url + "/v1/adapters", json={"name": "redos-again", "path": "redos"},
                          headers=ADMIN, timeout=30)
        assert resp.status_code == 201 and time.monotonic() - start < 2.0, resp.text
    finally:
        innocent.join(120)
        worst = probe.stop()
    assert texts == [alone] * 3
    assert worst < 1.0, probe.latencies
    assert metric_samples(server.url)[FAILURES] == before + len(reasons)
    resp = httpx.post(server.url + "/v1/adapters", json={"name": "cls-again", "path": "cls"}, headers=ADMIN, timeout=30)
    assert resp.status_code == 201, resp.text
    classify = httpx.post(server.url + "/v1/classify", json={"model": "cls-again", "text": "a b"}, headers=AUTH,
                          timeout=60)
    assert classify.status_code == 200, classify.text
    for name in ("redos-again", "cls-again"):
        assert httpx.delete(server.url + f"/v1/adapters/{name}", headers=ADMIN, timeout=30).status_code == 200


def test_a_huge_path_is_refused_at_once_and_not_echoed(hostile):
    server, _ = hostile
    before = metric_samples(server.url)[FAILURES]
    probe = HealthProbe(server.url)
    try:
        start = time.monotonic()
        for _ in range(5):
            resp = httpx.post(server.url + "/v1/adapters", json={"name": "x1", "path": "a/" * 100_000},
                              headers=ADMIN, timeout=30)
        elapsed = (time.monotonic() - start) / 5
    finally:
        worst = probe.stop()
    assert resp.status_code == 400 and elapsed < 1.0, (resp.status_code, elapsed)
    assert len(resp.text) < 500 and "a/a/a/a/" not in resp.text, resp.text
    assert "over the limit of 1024" in resp.json()["error"]["message"]
    assert worst < 1.0, probe.latencies
    long_name = httpx.post(server.url + "/v1/adapters", json={"name": "n" * 100_000, "path": "cls"}, headers=ADMIN,
                           timeout=30)
    assert long_name.status_code == 400 and len(long_name.text) < 500, long_name.text
    # refused names and paths are the request's mistakes, not adapter files that failed to load
    assert metric_samples(server.url)[FAILURES] == before
    resp = httpx.post(server.url + "/v1/adapters", json={"name": "tr-again", "path": "tr"}, headers=ADMIN, timeout=30)
    assert resp.status_code == 201, resp.text
    assert httpx.delete(server.url + "/v1/adapters/tr-again", headers=ADMIN, timeout=30).status_code == 200
    assert innocent_text(server.url)
