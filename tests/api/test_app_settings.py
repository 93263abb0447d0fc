"""Settings that need their own app: probes behind the key, CORS; and /docs examples. In-process
(Starlette's TestClient runs the lifespan, so the real engine starts and stops with the app)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lmservice.api.app import create_app
from lmservice.config import Settings


@pytest.fixture(scope="module")
def app_client(model_dirs):
    settings = Settings(model=model_dirs["base"], served_model_name="base", device="cpu", num_kv_blocks=64,
                        api_key=["k"], auth_probes=True, cors_origins=["https://app.example"])
    with TestClient(create_app(settings)) as client:
        yield client


def test_auth_probes_closes_probes(app_client):
    for probe in ("/health", "/ready", "/metrics"):
        assert app_client.get(probe).status_code == 401, probe
        assert app_client.get(probe, headers={"Authorization": "Bearer k"}).status_code == 200, probe


def test_cors_allows_only_configured_origins(app_client):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = app_client.options("/v1/generate", headers={"Origin": "https://app.example", **preflight})
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    other = app_client.options("/v1/generate", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_openapi_has_an_example_for_every_endpoint(app_client):
    spec = app_client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def has_example(schema_or_ref: dict) -> bool:
        if "$ref" in schema_or_ref:
            schema_or_ref = schemas[schema_or_ref["$ref"].rsplit("/", 1)[1]]
        return bool(schema_or_ref.get("examples") or schema_or_ref.get("example"))

    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            request = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if request is not None:
                assert has_example(request), f"{method} {path}: request without example"
            ok = op["responses"].get("200") or op["responses"].get("201")
            contents = ok.get("content", {})
            assert any(c.get("example") or (c.get("schema") and has_example(c["schema"]))
                       for c in contents.values()), f"{method} {path}: response without example"
    assert app_client.get("/docs").status_code == 200


def test_every_flag_docs_api_names_exists_and_every_http_limit_is_named():
    import re
    from pathlib import Path

    from lmservice.cli import build_parser
    from lmservice.config import Settings

    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    flags = set(re.findall(r"`--([a-z0-9-]+)", text)) - {"no-playground"}
    fields = {name.replace("_", "-") for name in Settings.model_fields}
    # a subcommand's own flags (lmservice batch --concurrency, ...) count too
    commands = next(a for a in build_parser()._actions if a.choices and isinstance(a.choices, dict))  # noqa: SLF001
    own = {opt[2:] for sub in commands.choices.values() for a in sub._actions  # noqa: SLF001
           for opt in a.option_strings if opt.startswith("--")}
    assert flags and not flags - fields - own, flags - fields - own
    limits = ("max-header-line-bytes", "max-header-bytes", "max-headers", "body-read-timeout-s",
              "header-read-timeout-s", "max-body-bytes", "max-structured-spec-bytes")
    assert all(limit in flags for limit in limits)
