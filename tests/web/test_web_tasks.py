"""Classify and Translate in the browser."""

from __future__ import annotations

import json
import re

import httpx

from tests.web.web_support import Tab, expect

TEXTS = ["a charming and often affecting journey .", "a dull , lifeless film .", "the acting is fine ."]
SENTENCES = ["A man is riding a bike.", "Two dogs are playing in the snow."]
# Words that only German among the two languages uses, and that any German sentence of Multi30k's kind has.
GERMAN = {"ein", "eine", "einem", "einen", "einer", "der", "die", "das", "den", "dem", "mit", "und", "im", "auf",
          "zwei", "mann", "frau", "hund", "hunde", "spielen", "fährt", "sitzt", "steht", "ist", "sind", "von"}


def test_classify_draws_a_bar_per_label(tab: Tab) -> None:
    tab.open("classify")
    page = tab.page
    expect(page.locator("#cls-model option")).not_to_have_count(0)
    page.fill("#cls-text", "\n".join(TEXTS))
    page.click("#cls-run")
    results = page.locator("#cls-results .result")
    expect(results).to_have_count(len(TEXTS))
    for i, text in enumerate(TEXTS):
        result = results.nth(i)
        expect(result.locator(".result-text")).to_have_text(text)
        labels = result.locator(".bar-label").all_inner_texts()
        assert labels == ["negative", "positive"], labels
        shown = [float(v.rstrip("%")) for v in result.locator(".bar-value").all_inner_texts()]
        assert abs(sum(shown) - 100) < 0.2, shown
        # Each bar is drawn as wide as its probability, and the label named is the most likely one.
        widths = result.locator(".bar").evaluate_all(
            "bars => bars.map(b => b.firstElementChild.getBoundingClientRect().width / b.clientWidth)")
        for width, percent in zip(widths, shown, strict=True):
            assert abs(100 * width - percent) < 2, (widths, shown)
        assert result.locator(".result-label strong").inner_text() == labels[shown.index(max(shown))]
    tab.screenshot("classify")
    tab.assert_no_console_errors()


def test_translate_offers_the_adapters_pair(tab: Tab) -> None:
    tab.open("translate")
    page = tab.page
    pair = page.locator("#tr-pair option")
    expect(pair).to_have_count(1)
    assert re.fullmatch(r"en → de \(.+\)", pair.inner_text()), pair.inner_text()
    page.fill("#tr-text", "\n".join(SENTENCES))
    if tab.server.name == "random":
        page.fill("#tr-max-tokens", "12")  # random weights rarely say EOS
    page.click("#tr-run")
    expect(page.locator("#tr-stats")).to_contain_text(" ms", timeout=60_000)
    lines = page.locator("#tr-output li").all_inner_texts()
    assert len(lines) == len(SENTENCES) and all(line.strip() for line in lines), lines
    if tab.server.name == "default":
        words = {w.lower() for line in lines for w in re.findall(r"\w+", line)}
        assert words & GERMAN, f"no German in {lines}"
        assert not set(lines) & set(SENTENCES)
    tab.screenshot("translate")
    tab.assert_no_console_errors()


def test_translate_with_beams_matches_the_api(tab: Tab) -> None:
    """The Beams field reaches /v1/translate: the page shows what the API answers for that many beams."""
    tab.open("translate")
    page = tab.page
    expect(page.locator("#tr-pair option")).to_have_count(1)
    page.fill("#tr-text", "\n".join(SENTENCES))
    page.fill("#tr-max-tokens", "12")
    for beams in ("1", "3"):
        page.fill("#tr-beams", beams)
        page.click("#tr-run")
        expect(page.locator("#tr-stats")).to_contain_text(f"{beams} beam", timeout=60_000)
        lines = page.locator("#tr-output li").all_inner_texts()
        api = httpx.post(f"{tab.server.url}/v1/translate", headers=tab.server.headers, timeout=60,
                         json={"text": SENTENCES, "max_tokens": 12, "num_beams": int(beams)}).json()
        assert lines == [t["text"] for t in api["translations"]], (beams, lines)
    tab.assert_no_console_errors()


def test_structured_output_is_shown_validated(tab: Tab) -> None:
    tab.open("structured")
    page = tab.page
    page.click("#st-run")
    expect(page.locator("#st-check")).to_contain_text("valid JSON, matches the schema", timeout=60_000)
    output = json.loads(page.locator("#st-output").inner_text())
    assert set(output) == {"name", "age", "pets"} and 0 <= output["age"] <= 120
    tab.screenshot("structured-valid")
    # a schema that is not JSON is the page's own error; one the server refuses shows the server's
    page.fill("#st-schema", "{not json")
    page.click("#st-run")
    expect(page.locator("#st-error")).to_contain_text("not JSON")
    tab.assert_no_console_errors()
    page.fill("#st-schema", '{"type": "string", "minLength": 5, "maxLength": 2}')
    page.click("#st-run")
    expect(page.locator("#st-error")).to_contain_text("response_format")
    # the browser itself logs the refused request (400); nothing else may have been logged
    assert all("400 (Bad Request)" in e for e in tab.console_errors), tab.console_errors
    tab.screenshot("structured")
