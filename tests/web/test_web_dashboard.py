"""The dashboard's numbers follow the server while a load runs."""

from __future__ import annotations

import threading
import time

from tests.web.web_support import Tab, expect, http

LOAD_S = 6.0
NUM_CLIENTS = 3


def _load(tab: Tab, stop: threading.Event, finished: list[int]) -> None:
    """One client: streamed generations back to back until `stop`."""
    with http(tab.server) as client:
        while not stop.is_set():
            body = {"prompt": "once upon a time", "max_tokens": 48, "ignore_eos": True, "stream": True}
            with client.stream("POST", "/v1/generate", json=body) as response:
                for _ in response.iter_lines():
                    pass
            finished.append(response.status_code)


def _shown(tab: Tab, card: str, series: str) -> float:
    text = tab.page.locator(f"[data-card={card}] [data-series='{series}'] strong").inner_text()
    return float(text) if text not in ("", "–") else 0.0


def test_dashboard_numbers_move_under_load(tab: Tab) -> None:
    tab.open("dashboard")
    expect(tab.page.locator("#dash-status")).to_contain_text("updated")
    base_before = _shown(tab, "models", "base") if tab.page.locator("[data-card=models] [data-series=base]").count() else 0
    stop, finished = threading.Event(), []
    clients = [threading.Thread(target=_load, args=(tab, stop, finished)) for _ in range(NUM_CLIENTS)]
    for client in clients:
        client.start()
    seen: dict[str, set[float]] = {"generated": set(), "running": set(), "kv": set()}
    try:
        deadline = time.monotonic() + LOAD_S
        while time.monotonic() < deadline:
            seen["generated"].add(_shown(tab, "tokens", "generated"))
            seen["running"].add(_shown(tab, "requests", "running"))
            seen["kv"].add(_shown(tab, "kv", "used"))
            time.sleep(0.25)
        tab.screenshot("dashboard-under-load")
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=120)
    assert finished and set(finished) == {200}, finished
    assert max(seen["generated"]) > 0 and len(seen["generated"]) >= 3, f"tokens/s shown: {sorted(seen['generated'])}"
    assert max(seen["running"]) >= 1, f"running shown: {sorted(seen['running'])}"
    assert max(seen["kv"]) > 0, f"KV usage shown: {sorted(seen['kv'])}"
    # The per-model totals catch up with every finished request, and running falls back to 0.
    base = tab.page.locator("[data-card=models] [data-series=base] strong")
    expect(base).to_have_text(str(int(base_before) + len(finished)), timeout=10_000)
    expect(tab.page.locator("[data-card=requests] [data-series=running] strong")).to_have_text("0")
    tab.assert_no_console_errors()
