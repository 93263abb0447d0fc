"""Small parts of the HTTP surface: HEAD /, no trailing-slash redirects (a Location built from the client's
Host header), /docs from the package with the CSP every response carries, and /health naming the kernels."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from lmservice.api.app import create_app
from lmservice.api.playground import SWAGGER_UI_DIR
from lmservice.config import Settings


@pytest.fixture(scope="module")
def bare() -> TestClient:
    return TestClient(create_app(Settings(api_key=["k"])))  # not entered: no engine, static routes only


def test_head_of_the_page_is_200(bare):
    assert bare.head("/").status_code == 200


@pytest.mark.parametrize("path", ["/v1/completions/", "/health/", "/docs/"])
def test_no_redirect_built_from_the_host_header(bare, path):
    resp = bare.post(path, headers={"Host": "evil.example"}, follow_redirects=False) if path.startswith("/v1") \
        else bare.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
    assert resp.status_code in (401, 404) and "location" not in resp.headers
    assert "evil.example" not in resp.text


def test_docs_load_nothing_from_elsewhere(bare):
    page = bare.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert urls and all(u.startswith("/docs/") for u in urls), urls
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text)  # no inline script: the CSP forbids it
    for url in urls:
        assert bare.get(url).status_code == 200, url
    assert bare.get("/docs/swagger-ui-bundle.js").content == (SWAGGER_UI_DIR / "swagger-ui-bundle.js").read_bytes()
    assert bare.get("/docs/index.html").status_code == 404  # only the docs' own files
    assert bare.get("/redoc").status_code == 404  # it would load from a CDN


@pytest.mark.parametrize("path", ["/docs", "/docs/docs.js", "/", "/openapi.json", "/v1/models", "/nope"])
def test_every_response_carries_the_policy(bare, path):
    resp = bare.get(path)
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert resp.headers["x-content-type-options"] == "nosniff"


def test_health_names_the_kernels_in_use(http):
    kernels = http.get("/health").json()["kernels"]
    assert kernels["ops"] in {"torch", "native", "triton"} and kernels["cpu"]
    assert "/" not in kernels["cpu"]  # the build's name, not a path: /health is open
