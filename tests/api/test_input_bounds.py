"""Inputs whose cost grows with their size, and inputs of the wrong type: long texts are refused before they
are tokenized (the event loop never stalls on them), token ids are integers only, and a body that is not
UTF-8 is a 422 like any other malformed JSON."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.api.bystander import Bystander, innocent_text
from tests.servers import API_KEY, AUTH, start_server

MB = 1 << 20


@pytest.fixture(scope="module")
def roomy(model_dirs, tmp_path_factory):
    """Bodies of a few MiB are allowed here, so that the length check (not the body limit) refuses them."""
    srv = start_server(model_dirs, tmp_path_factory, "roomy", "--api-key", API_KEY, "--max-body-bytes", str(4 * MB))
    yield srv
    srv.stop()


LONG_TEXT = "hello world " * (MB // 12)


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": LONG_TEXT}, "prompt"),
    ("/v1/completions", {"model": "base", "prompt": LONG_TEXT, "max_tokens": 1}, "prompt"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": LONG_TEXT}]}, "messages"),
    ("/v1/embeddings", {"model": "base", "input": [LONG_TEXT]}, "input"),
])
def test_megabyte_texts_are_refused_without_stalling_health(roomy, path, body, param):
    alone = innocent_text(roomy.url)
    with Bystander(roomy.url, alone, max_health_s=0.5) as bystander, httpx.Client(timeout=60) as client:
        def one(_):
            start = time.perf_counter()
            resp = client.post(roomy.url + path, json=body, headers=AUTH)
            return resp, time.perf_counter() - start

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(12)))
    for resp, _ in results:
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text[:300]
        assert "context" in resp.json()["error"]["message"]
    print(f"{path}: slowest refusal {max(t for _, t in results) * 1000:.0f} ms, "
          f"/health worst {bystander.probe.worst_s * 1000:.0f} ms")


def test_texts_that_fit_are_still_tokenized(http):
    ids = http.post("/tokenize", json={"prompt": "hello " * 200}).json()["tokens"]
    assert len(ids) >= 200


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"model": "base", "prompt": [1, True], "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"model": "base", "prompt": [[1.0, 2]], "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"model": "base", "prompt": "x", "stop_token_ids": ["1"], "max_tokens": 1}, "stop_token_ids"),
    ("/detokenize", {"tokens": [1, "1"]}, "tokens"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
    ("/v1/embeddings", {"model": "base", "input": [2.0]}, "input"),
])
def test_token_ids_must_be_integers(http, path, body, param):
    resp = http.post(path, json=body)
    assert resp.status_code == 422 and resp.json()["error"]["param"] == param, resp.text[:300]


@pytest.mark.parametrize("raw, reason", [
    (b'{"prompt": "\xff\xfe"}', "not UTF-8"),
    (b'{"prompt": "x", "stop": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "nested too deeply"),
    (b'{"prompt": ', "JSON"),
])
def test_unreadable_bodies_are_422(http, raw, reason):
    resp = http.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text[:300]
    message = resp.json()["error"]["message"]
    assert message.startswith("malformed JSON body") and reason in message
