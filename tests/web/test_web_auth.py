"""A server with --api-key: the page asks for a key, keeps it for the tab only, and shows the server's error
for a wrong one; before a key it shows nothing of the server."""

from __future__ import annotations

import re

from tests.web.web_support import Tab, WebServer, expect, http

# The browser reports every 401 answer in the console; here those are the expected answers to a missing or
# wrong key, and anything else is still an error.
_UNAUTHORIZED = re.compile(r"^Failed to load resource: the server responded with a status of 401")


def _unexpected_errors(tab: Tab) -> list[str]:
    return [e for e in tab.console_errors if not _UNAUTHORIZED.match(e)]


def test_key_gate(make_tab, random_server: WebServer) -> None:
    tab = make_tab(random_server).open(with_key=False)
    page = tab.page
    expect(page.locator("#key-gate")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()
    expect(page.locator("#key-input")).to_be_focused()
    # Nothing the server knows is on the page: no model names, no numbers from /metrics.
    assert page.locator("#gen-model option, #cls-model option, #dash-cards [data-series]").count() == 0
    assert page.inner_text("#server-info") == ""
    tab.screenshot("key-gate")

    page.fill("#key-input", "not-the-key")
    page.press("#key-input", "Enter")
    with http(random_server) as client:
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer not-the-key"}).json()
    expect(page.locator("#key-error")).to_have_text(wrong["error"]["message"])  # the server's own words
    expect(page.locator("#app")).to_be_hidden()
    tab.screenshot("wrong-key")

    page.fill("#key-input", random_server.api_key)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#key-error")).to_be_hidden()
    assert page.locator("#gen-model option").all_inner_texts()[0] == "base"
    # Kept for this tab only: in sessionStorage, not in localStorage or a cookie.
    assert page.evaluate("() => sessionStorage.getItem('lmservice.apiKey')") == random_server.api_key
    assert page.evaluate("() => localStorage.length + document.cookie.length") == 0
    # A model call works with it.
    page.fill("#gen-max-tokens", "4")
    page.click("#gen-run")
    expect(page.locator("#gen-stats")).to_contain_text("finish:", timeout=60_000)

    other = page.context.new_page()  # another tab of the same browser starts without the key
    other.goto(random_server.url + "/")
    expect(other.locator("#key-gate")).to_be_visible()
    other.close()

    page.click("#forget-key")
    expect(page.locator("#key-gate")).to_be_visible()
    assert page.evaluate("() => sessionStorage.length") == 0
    assert _unexpected_errors(tab) == []


def test_no_key_needed_means_no_gate(make_tab, default_server: WebServer) -> None:
    tab = make_tab(default_server).open()
    expect(tab.page.locator("#app")).to_be_visible()
    expect(tab.page.locator("#key-gate")).to_be_hidden()
    expect(tab.page.locator("#forget-key")).to_be_hidden()
    tab.assert_no_console_errors()
