"""API keys, admin key, body limit, request ids, and prompts kept out of the logs."""

from __future__ import annotations

import uuid

import httpx

from tests.servers import ADMIN_KEY, API_KEY


def test_keys_enforced_and_probes_open(server):
    body = {"prompt": "hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {API_KEY}"}):
        resp = httpx.post(server.url + "/v1/generate", json=body, headers=headers)
        assert resp.status_code == 401, headers
        assert resp.json()["error"]["type"] == "authentication_error"
    for key in (API_KEY, "second-key"):
        assert httpx.post(server.url + "/v1/generate", json=body,
                          headers={"Authorization": f"bearer {key}"}).status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 401
    for probe in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + probe).status_code == 200, probe


def test_admin_endpoints_take_only_the_admin_key(server, http):
    add = {"name": "cls2", "path": "cls"}
    assert httpx.post(server.url + "/v1/adapters", json=add).status_code == 401
    assert http.post("/v1/adapters", json=add).status_code == 401  # the API key is not the admin key
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    escape = httpx.post(server.url + "/v1/adapters", json={"name": "x", "path": "../base"}, headers=admin)
    assert escape.status_code == 400 and escape.json()["error"]["param"] == "path"
    resp = httpx.post(server.url + "/v1/adapters", json=add, headers=admin)
    assert resp.status_code == 201, resp.text
    assert resp.json()["tasks"] == ["classify"]
    assert "cls2" in [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert http.post("/v1/classify", json={"model": "cls2", "text": "fine"}).status_code == 200
    assert httpx.delete(server.url + "/v1/adapters/cls2", headers=admin).status_code == 200
    assert httpx.delete(server.url + "/v1/adapters/cls2", headers=admin).status_code == 404
    assert http.post("/v1/classify", json={"model": "cls2", "text": "fine"}).status_code == 404


def test_oversized_body_is_413(http):
    resp = http.post("/v1/generate", json={"prompt": "x" * 70_000})  # server limit: 65536 bytes
    assert resp.status_code == 413
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert "x-request-id" in resp.headers
    chunked = http.post("/v1/generate", content=iter([b"x" * 40_000, b"x" * 40_000]),  # no Content-Length
                        headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_is_422_in_the_error_shape(http):
    resp = http.post("/v1/completions", content=b'{"prompt": ', headers={"Content-Type": "application/json"})
    assert resp.status_code == 422
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert http.get("/v1/nope").json()["error"]["type"] == "not_found_error"


def test_request_id_echoed_or_generated(http):
    assert http.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = http.get("/health").headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert http.get("/health", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"] != \
        "bad id\twith spaces"
    assert http.post("/v1/generate", json={"prompt": "x", "max_tokens": -1}).headers["x-request-id"]


def test_one_json_log_line_per_request_and_no_prompts(server, http):
    marker = f"secret-{uuid.uuid4().hex}"
    request_id = f"log-{uuid.uuid4().hex[:8]}"
    resp = http.post("/v1/generate", json={"prompt": marker, "max_tokens": 3, "temperature": 0,
                                           "ignore_eos": True}, headers={"X-Request-ID": request_id})
    assert resp.status_code == 200
    from tests.api.test_cancellation import access_record

    rec = access_record(server, request_id)
    assert rec["status"] == 200 and rec["model"] == "base" and rec["path"] == "/v1/generate"
    assert rec["prompt_tokens"] == resp.json()["usage"]["prompt_tokens"] and rec["completion_tokens"] == 3
    assert rec["duration_ms"] > 0 and "ttft_ms" in rec
    assert sum(1 for r in server.log_records() if r.get("request_id") == request_id) == 1
    assert marker not in server.log()
