"""The playground's routes (lmservice/api/playground): what is served, to whom, and that it ships in the package.

No engine and no browser: the app is built without its lifespan, which is all a static route needs. The page
in a real browser is tested in tests/web.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
import tomllib
from fastapi.testclient import TestClient

from lmservice.api.app import create_app
from lmservice.api.playground import STATIC_DIR
from lmservice.cli import build_parser, settings_from_args
from lmservice.config import Settings

ROOT = Path(__file__).resolve().parents[2]
INDEX = (STATIC_DIR / "index.html").read_text()


def _client(**settings) -> TestClient:
    return TestClient(create_app(Settings(**settings)))  # not entered: the engine is never built


def _referenced_assets() -> set[str]:
    """Every file the page loads: src/href of index.html and the imports of every module, followed."""
    names = set(re.findall(r'(?:src|href)="/playground/([^"]+)"', INDEX))
    todo = [n for n in names if n.endswith(".js")]
    while todo:
        for imported in re.findall(r'from "\./([^"]+)"', (STATIC_DIR / todo.pop()).read_text()):
            if imported not in names:
                names.add(imported)
                todo.append(imported)
    return names


def test_page_is_served_without_a_key_and_reveals_nothing() -> None:
    client = _client(api_key=["secret"])
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="/playground/app.js">' in response.text
    assert "secret" not in response.text
    assert client.get("/v1/models").status_code == 401  # the API itself still wants the key


def test_every_asset_the_page_loads_is_served() -> None:
    client = _client()
    assets = _referenced_assets()
    assert {"app.js", "api.js", "style.css", "dashboard.js", "chart.js"} <= assets
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for name in assets:
        response = client.get(f"/playground/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"].startswith(types[Path(name).suffix]), name
        assert response.headers["x-content-type-options"] == "nosniff"


def test_policy_forbids_inline_code_and_the_page_needs_none() -> None:
    csp = _client().get("/").headers["content-security-policy"]
    assert "script-src 'self';" in csp and "connect-src 'self';" in csp and "unsafe-inline" not in csp
    # The policy above would block these; the page must not depend on any.
    assert not re.search(r"<script(?![^>]*\bsrc=)", INDEX), "inline <script>"
    assert not re.search(r"\sstyle=|<style|\son[a-z]+=", INDEX), "inline style or event handler"


@pytest.mark.parametrize("path", ["/playground/nope.js", "/playground/..%2F__init__.py", "/playground/",
                                  "/playground/%2E%2E/%2E%2E/config.py"])
def test_unknown_files_are_404_in_the_error_shape(path: str) -> None:
    response = _client().get(path)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_no_playground_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(playground=False)
    assert client.get("/").status_code == 404
    assert client.get("/playground/app.js").status_code == 404
    assert client.get("/health").status_code == 200
    assert settings_from_args(build_parser().parse_args(["serve", "--no-playground"])).playground is False
    assert settings_from_args(build_parser().parse_args(["serve"])).playground is True
    monkeypatch.setenv("LMSERVICE_PLAYGROUND", "false")
    assert Settings().playground is False


def test_static_files_are_package_data() -> None:
    """An installed lmservice (pip install ., the Docker image) carries every file of the page."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["lmservice.api.playground"]
    package_dir = STATIC_DIR.parent
    files = [p.relative_to(package_dir).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert files
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert not unshipped, f"not in [tool.setuptools.package-data]: {unshipped}"
