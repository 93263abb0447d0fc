"""The playground in a real browser: Debian's Chromium driven by Playwright, against real `lmservice serve`
processes (tests/api's ServerProcess) on two model sets:

- "default": the shipped models/ (base, sentiment, translate-en-de), no API key;
- "random": tests/api's tiny random-weight GPT-2 with its classify and translate adapters, served with
  `--api-key`, so every model call the page makes needs the key.

Chromium comes from the system (`apt-get install chromium`, scripts/install_ci_tools.sh), never from
`playwright install` (its download is not reachable everywhere). Without it, or without the playwright
package, the tests skip with the reason, and fail under CI=true, as tests/deploy do with their tools.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.deploy.deploy_support import missing
from tests.web.web_support import (
    API_KEY,
    CHROMIUM_ARGS,
    ROOT,
    ServerProcess,
    Tab,
    WebServer,
    chromium_path,
    new_tab,
)


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright (the `test` extra)")
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def _start(name: str, dirs: dict[str, Path], tmp_path_factory, *flags: str,
           api_key: str | None = None) -> Iterator[WebServer]:
    process = ServerProcess(dirs, tmp_path_factory.mktemp(f"web_{name}") / "server.log", *flags).wait_ready()
    yield WebServer(name, process, api_key)
    process.stop()


@pytest.fixture(scope="session")
def default_server(tmp_path_factory) -> Iterator[WebServer]:
    yield from _start("default", {"base": ROOT / "models" / "base", "adapters": ROOT / "models"}, tmp_path_factory)


@pytest.fixture(scope="session")
def random_server(model_dirs, tmp_path_factory) -> Iterator[WebServer]:  # noqa: F811
    yield from _start("random", model_dirs, tmp_path_factory, "--api-key", API_KEY, api_key=API_KEY)


@pytest.fixture(params=["default", "random"])
def server(request) -> WebServer:
    """A test that takes `server` runs against both model sets."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def make_tab(browser, request) -> Iterator[Callable[..., Tab]]:
    """make_tab(server, viewport=..., color_scheme=...): a fresh browser context (its own sessionStorage)
    with one page; every one is closed after the test."""
    tabs: list[Tab] = []

    def make(server: WebServer, **options) -> Tab:
        tabs.append(new_tab(browser, server, request.node.name, **options))
        return tabs[-1]

    yield make
    for tab in tabs:
        tab.page.context.close()


@pytest.fixture
def tab(make_tab, server) -> Tab:
    """A desktop-sized tab on `server` (both model sets)."""
    return make_tab(server)
