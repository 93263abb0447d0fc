"""/docs in a real browser (Debian's Chromium, as tests/web): Swagger UI renders every operation of the
schema under the CSP every response carries, with no console error and no request to another origin.
(Swagger UI 4, what the Python package of it ships, fails this: it cannot read OpenAPI 3.1.)"""

from __future__ import annotations

import httpx

from tests.deploy.deploy_support import missing
from tests.web.web_support import CHROMIUM_ARGS, chromium_path


def test_swagger_ui_renders_every_operation_from_this_origin_only(server):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright (the `test` extra)")
    schema = httpx.get(server.url + "/openapi.json", timeout=30).json()
    num_operations = sum(len(item) for item in schema["paths"].values())
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            problems, foreign = [], []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("request", lambda r: None if r.url.startswith(server.url) else foreign.append(r.url))
            page.goto(server.url + "/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            assert page.locator(".opblock").count() == num_operations
        finally:
            browser.close()
    assert not problems and not foreign, (problems, foreign)
