"""The page itself: it loads cleanly, every tab works, and it is usable by keyboard, in both colour schemes and
at phone width."""

from __future__ import annotations

import pytest

from tests.web.web_support import PHONE, Tab, WebServer, expect

PANELS = ["generate", "chat", "classify", "translate", "structured", "dashboard"]

# WCAG 2 contrast of every visible element that has text of its own, against the first opaque background
# behind it: 4.5:1, or 3:1 for large text. Disabled controls are exempt (as in WCAG).
CONTRAST_FAILURES = """() => {
    const rgba = (css) => {
        const [r, g, b, a = 1] = css.match(/[\\d.]+/g).map(Number);
        return {r, g, b, a};
    };
    const luminance = ({r, g, b}) => {
        const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
        return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const background = (node) => {
        for (; node; node = node.parentElement) {
            const c = rgba(getComputedStyle(node).backgroundColor);
            if (c.a > 0.5) return c;
        }
        return {r: 255, g: 255, b: 255, a: 1};
    };
    const failures = [];
    for (const node of document.querySelectorAll("body *")) {
        const ownText = [...node.childNodes].some((n) => n.nodeType === Node.TEXT_NODE && n.textContent.trim());
        if (!ownText || node.tagName === "OPTION" || !node.checkVisibility() || node.closest(":disabled")) continue;
        const style = getComputedStyle(node);
        const [l1, l2] = [luminance(rgba(style.color)), luminance(background(node))].sort((a, b) => b - a);
        const ratio = (l1 + 0.05) / (l2 + 0.05);
        const size = parseFloat(style.fontSize);
        const large = size >= 24 || (Number(style.fontWeight) >= 700 && size >= 18.66);
        if (ratio < (large ? 3 : 4.5)) failures.push(`${node.tagName}#${node.id} "${node.textContent.trim().slice(0, 30)}": ${ratio.toFixed(2)}`);
    }
    return failures;
}"""

# Every form control has a label, every button a name.
UNLABELLED = """() => [
    ...[...document.querySelectorAll("input, select, textarea")]
        .filter((n) => !n.labels.length && !n.getAttribute("aria-label")).map((n) => n.id),
    ...[...document.querySelectorAll("button")].filter((n) => !n.textContent.trim()).map((n) => n.id),
]"""


def _fill_every_panel(tab: Tab) -> None:
    """Give every panel something to show: a generation, a classification, a translation."""
    page = tab.page
    tab.select("generate")
    page.fill("#gen-max-tokens", "8")
    page.click("#gen-run")
    expect(page.locator("#gen-stats")).to_contain_text("finish:", timeout=60_000)
    tab.select("classify")
    page.click("#cls-run")
    expect(page.locator("#cls-results .result")).not_to_have_count(0)
    tab.select("translate")
    page.fill("#tr-max-tokens", "8")
    expect(page.locator("#tr-pair option")).to_have_count(1)
    page.click("#tr-run")
    expect(page.locator("#tr-stats")).to_contain_text(" ms", timeout=60_000)


def test_page_loads_and_every_tab_works_without_console_errors(tab: Tab) -> None:
    tab.open()
    expect(tab.page.locator("#app")).to_be_visible()
    models = tab.page.locator("#gen-model option").all_inner_texts()
    assert models and models[0] == "base", models
    for panel in PANELS:
        tab.select(panel)
        expect(tab.page.locator(f"#tab-{panel}")).to_have_attribute("aria-selected", "true")
        assert tab.page.url.endswith(f"#{panel}")
    expect(tab.page.locator("#dash-status")).to_contain_text("updated")  # /metrics read at least once
    tab.screenshot("loaded")
    tab.assert_no_console_errors()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_labels_and_contrast(make_tab, default_server: WebServer, scheme: str) -> None:
    tab = make_tab(default_server, color_scheme=scheme).open()
    _fill_every_panel(tab)
    assert tab.page.evaluate(UNLABELLED) == []
    for panel in PANELS:
        tab.select(panel)
        tab.page.wait_for_timeout(200)
        assert tab.page.evaluate(CONTRAST_FAILURES) == [], f"{panel} ({scheme})"
    tab.screenshot(f"dashboard-{scheme}")
    tab.assert_no_console_errors()


def test_keyboard_only(make_tab, default_server: WebServer) -> None:
    """Tabs follow the WAI-ARIA pattern (arrows, Home, End; one tab stop), the focus is always visible,
    and a generation can be run from the keyboard alone."""
    tab = make_tab(default_server).open()
    page = tab.page
    focused = lambda: page.evaluate("() => document.activeElement.id")  # noqa: E731
    page.keyboard.press("Tab")  # the skip link first
    assert page.evaluate("() => document.activeElement.className") == "skip"
    page.keyboard.press("Tab")
    assert focused() == "tab-generate"
    for key, expected in [("ArrowRight", "chat"), ("End", "dashboard"), ("ArrowRight", "generate"),
                          ("ArrowLeft", "dashboard"), ("Home", "generate")]:
        page.keyboard.press(key)
        assert focused() == f"tab-{expected}", key
        expect(page.locator(f"#panel-{expected}")).to_be_visible()
    page.keyboard.press("Tab")  # from the tab list into its panel, then its first field
    assert focused() == "panel-generate"
    page.keyboard.press("Tab")
    assert focused() == "gen-prompt"
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle + ' ' + "
                            "getComputedStyle(document.activeElement).outlineWidth")
    assert outline == "solid 3px", f"focus ring of the prompt: {outline}"
    page.keyboard.press("Control+A")
    page.keyboard.type("the little dog")
    page.focus("#gen-max-tokens")
    page.keyboard.press("Control+A")
    page.keyboard.type("8")
    while focused() != "gen-run":
        page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(page.locator("#gen-stats")).to_contain_text("finish:", timeout=60_000)
    expect(page.locator("#gen-prompt-echo")).to_have_text("the little dog")
    tab.assert_no_console_errors()


def test_phone_width(make_tab, default_server: WebServer) -> None:
    """At 390 px nothing needs sideways scrolling, on any tab, with results shown."""
    tab = make_tab(default_server, viewport=PHONE).open()
    _fill_every_panel(tab)
    for panel in PANELS:
        tab.select(panel)
        tab.page.wait_for_timeout(200)
        overflow = tab.page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{panel}: {overflow}px wider than the screen"
        tab.screenshot(f"phone-{panel}")
    tab.assert_no_console_errors()
