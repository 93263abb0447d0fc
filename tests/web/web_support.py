"""What the browser tests share: the servers they drive, a browser tab on the playground, Chromium's path.

See conftest.py for the set-up. Screenshots go to runs/test-artifacts/web/<test>/.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.deploy.deploy_support import missing
from tests.servers import ROOT, ServerProcess, metric_samples

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture says so (a skip, or a failure under CI=true)
    expect = None

ARTIFACTS = ROOT / "runs" / "test-artifacts" / "web"
API_KEY = "web-test-key"
# Without the background-networking flags Chromium keeps trying to reach Google's services, which on a closed
# network is a stream of refused connections; the rest make a quiet, reproducible headless browser.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
DESKTOP = {"width": 1100, "height": 900}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing("chromium (Debian's chromium package)")
    return path


@dataclass
class WebServer:
    """A running server and what a client needs to talk to it."""

    name: str
    process: ServerProcess
    api_key: str | None

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample of /metrics (0 when absent)."""
        key = (name, tuple(sorted((labels or {}).items())))
        return metric_samples(self.url, self.headers).get(key, 0.0)

    def wait_metric(self, name: str, value: float, timeout_s: float = 10.0) -> float:
        """Poll /metrics until `name` equals `value`; return the last value read."""
        deadline = time.monotonic() + timeout_s
        seen = self.metric(name)
        while seen != value and time.monotonic() < deadline:
            time.sleep(0.05)
            seen = self.metric(name)
        return seen


@dataclass
class Tab:
    """One browser tab on the playground, with what its console said."""

    page: object  # playwright.sync_api.Page
    server: WebServer
    artifacts: Path
    console_errors: list[str] = field(default_factory=list)

    def open(self, panel: str = "generate", *, with_key: bool = True) -> Tab:
        """Load the page on `panel`; with the server's key already in the tab's sessionStorage (what typing
        it does) unless `with_key` is False. Returns once the page shows its tabs (or its key form)."""
        if with_key and self.server.api_key:
            self.page.add_init_script(f"sessionStorage.setItem('lmservice.apiKey', {self.server.api_key!r})")
        self.page.goto(f"{self.server.url}/#{panel}")
        self.page.wait_for_selector("#app:not([hidden]), #key-gate:not([hidden])")
        return self

    def select(self, panel: str) -> None:
        self.page.click(f"#tab-{panel}")
        expect(self.page.locator(f"#panel-{panel}")).to_be_visible()

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def count_updates(self, selector: str) -> None:
        """From now on, count the changes of the element's text (in window.__updates)."""
        self.page.evaluate("""(selector) => {
            const node = document.querySelector(selector);
            window.__updates = 0;
            new MutationObserver(() => { window.__updates += 1; })
                .observe(node, {childList: true, characterData: true, subtree: true});
        }""", selector)

    def updates(self) -> int:
        return self.page.evaluate("() => window.__updates")

    def assert_no_console_errors(self) -> None:
        assert not self.console_errors, f"the page logged errors: {self.console_errors}"


def _artifacts_dir(node_name: str) -> Path:
    path = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "-", node_name).strip("-")
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_tab(browser, server: WebServer, node_name: str, viewport: dict | None = None,
            color_scheme: str = "light") -> Tab:
    context = browser.new_context(viewport=viewport or DESKTOP, color_scheme=color_scheme)
    page = context.new_page()
    page.set_default_timeout(30_000)
    tab = Tab(page, server, _artifacts_dir(node_name))
    page.on("console", lambda msg: msg.type == "error" and tab.console_errors.append(msg.text))
    page.on("pageerror", lambda exc: tab.console_errors.append(f"uncaught: {exc}"))
    return tab


def http(server: WebServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=server.headers, timeout=60)


def max_model_len(server: WebServer) -> int:
    with http(server) as client:
        return client.get("/v1/models").json()["data"][0]["max_model_len"]
