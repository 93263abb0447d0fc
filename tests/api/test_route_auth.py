"""No route ships unguarded: every operation in the OpenAPI schema answers 401 with no key and with a wrong
key, except the probes docs/api.md documents as open (open unless --auth-probes). A new route without the
API-key dependency fails here; so does a probe that starts asking for one."""

from __future__ import annotations

import re

import httpx
import pytest

OPEN = {"/health", "/ready", "/metrics"}  # docs/api.md, Endpoints: "open*"


@pytest.fixture(scope="module")
def operations(server) -> list[tuple[str, str]]:
    schema = httpx.get(server.url + "/openapi.json", timeout=30).json()
    ops = [(method.upper(), re.sub(r"\{[^}]+\}", "x", path))
           for path, item in schema["paths"].items() for method in item if method in {"get", "post", "delete", "put",
                                                                                       "patch"}]
    assert len(ops) >= 14 and ("POST", "/v1/completions") in ops and ("DELETE", "/v1/adapters/x") in ops
    return ops


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic abc"}])
def test_every_guarded_operation_refuses_a_missing_or_wrong_key(server, operations, headers):
    unguarded = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path in operations:
            if path in OPEN:
                continue
            body = {} if method in {"POST", "PUT", "PATCH"} else None
            resp = client.request(method, path, json=body, headers=headers)
            if resp.status_code != 401 or resp.json()["error"]["type"] != "authentication_error":
                unguarded.append((method, path, resp.status_code))
    assert not unguarded


def test_only_the_documented_probes_are_open(server, operations):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        open_paths = {path for method, path in operations if client.request(method, path).status_code != 401}
        assert open_paths == OPEN
        # Outside the schema: the docs, the schema itself and the playground are open and reveal nothing.
        for path in ("/openapi.json", "/docs", "/docs/swagger-ui-bundle.js", "/", "/playground/app.js"):
            assert client.get(path).status_code == 200, path
