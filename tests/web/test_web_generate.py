"""Generate and Chat in the browser: text arrives in several updates, and Stop really cancels on the server."""

from __future__ import annotations

import re
import time

from tests.web.web_support import Tab, expect, max_model_len

PROMPT = "once upon a time"


def _fill_generate(tab: Tab, max_tokens: int, ignore_eos: bool = False) -> None:
    page = tab.page
    page.fill("#gen-prompt", PROMPT)
    page.fill("#gen-max-tokens", str(max_tokens))
    page.fill("#gen-temperature", "0.8")
    page.fill("#gen-seed", "1")
    page.set_checked("#gen-ignore-eos", ignore_eos)


def test_generate_streams_text_in_several_updates(tab: Tab) -> None:
    tab.open("generate")
    _fill_generate(tab, max_tokens=32, ignore_eos=True)
    tab.count_updates("#gen-text")
    tab.page.click("#gen-run")
    stats = tab.page.locator("#gen-stats")
    expect(stats).to_contain_text("finish: length", timeout=60_000)
    # Each streamed event appends to the text: one update per event, so a streamed answer has many.
    assert tab.updates() >= 3, f"the text arrived in {tab.updates()} update(s)"
    assert tab.page.inner_text("#gen-text").strip()
    assert re.search(r"TTFT \d+ ms · 32 tokens · [\d.]+ tok/s", stats.inner_text()), stats.inner_text()
    tab.screenshot("generate")
    tab.assert_no_console_errors()


def test_stop_cancels_the_request_on_the_server(tab: Tab) -> None:
    server = tab.server
    max_tokens = max_model_len(server) - 16  # the whole context: far more than the test lets it generate
    generated_before = server.metric("lmservice_generation_tokens_total", {"model": "base"})
    tab.open("generate")
    _fill_generate(tab, max_tokens=max_tokens, ignore_eos=True)
    tab.count_updates("#gen-text")
    tab.page.click("#gen-run")
    tab.page.wait_for_function("() => window.__updates >= 3")
    # The check below is only worth something while the request is still running on the server.
    assert server.metric("lmservice_num_requests_running") >= 1
    tab.page.click("#gen-stop")
    expect(tab.page.locator("#gen-stats")).to_contain_text("stopped")
    assert server.wait_metric("lmservice_num_requests_running", 0) == 0
    assert server.wait_metric("lmservice_kv_cache_usage_perc", 0) == 0, "the aborted request kept KV blocks"
    shown = tab.page.inner_text("#gen-text")
    time.sleep(0.5)
    assert tab.page.inner_text("#gen-text") == shown, "text kept arriving after Stop"
    generated = server.metric("lmservice_generation_tokens_total", {"model": "base"}) - generated_before
    assert 0 < generated < max_tokens, f"{generated} tokens generated of {max_tokens}: the request was not cut short"
    expect(tab.page.locator("#gen-run")).to_be_enabled()
    tab.screenshot("stopped")
    tab.assert_no_console_errors()


def test_chat_streams_a_reply(tab: Tab) -> None:
    tab.open("chat")
    page = tab.page
    page.fill("#chat-max-tokens", "24")
    # Greedy: a sampled reply of the random-weight model can hit EOS or the stop string after a token or two
    # (seen once in CI); greedy text is the same on every run, so the update count below is stable.
    page.fill("#chat-temperature", "0")
    page.fill("#chat-input", "tell me a story about a dog")
    page.press("#chat-input", "Enter")  # Enter sends
    expect(page.locator("#chat-stats")).to_contain_text("finish:", timeout=60_000)
    messages = page.locator("#chat-transcript .msg")
    expect(messages).to_have_count(2)
    expect(messages.nth(0)).to_contain_text("tell me a story about a dog")
    assert messages.nth(1).locator(".content").inner_text().strip(), "the assistant's reply is empty"
    updates = int(re.search(r"(\d+) updates", page.inner_text("#chat-stats")).group(1))
    assert updates >= 3, f"the reply arrived in {updates} update(s)"
    # A second turn continues the same conversation.
    page.fill("#chat-input", "and then?")
    page.click("#chat-send")
    expect(messages).to_have_count(4, timeout=60_000)
    expect(page.locator("#chat-send")).to_be_enabled(timeout=60_000)
    tab.screenshot("chat")
    tab.assert_no_console_errors()
