"""The jobs' data loading repairs broken text with ftfy, in every format, unless told not to."""

from __future__ import annotations

import json

from lmservice.train.data import clean_text, load_parallel, load_table, load_text, text_fix_note

# UTF-8 bytes of curly quotes and an umlaut read as Windows-1252: what the raw TinyStories text holds.
BROKEN = "she said \u00e2\u20ac\u0153hi\u00e2\u20ac\u009d and it\u00e2\u20ac\u2122s gr\u00c3\u00bcn"
FIXED = "she said \u201chi\u201d and it\u2019s grün"  # repaired, quotes kept as written


def test_plain_text_is_repaired(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(BROKEN + "\nein Mädchen läuft über die Straße\n", encoding="utf-8")
    assert load_text([path], fix=True)["text"] == [FIXED + "\n", "ein Mädchen läuft über die Straße\n"]
    assert load_text([path])["text"][0] == BROKEN + "\n"  # the default of the function: untouched


def test_table_columns_and_parallel_files_are_repaired(tmp_path):
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"text": BROKEN, "label": "a\u00e2\u20ac\u2122"}) + "\n", encoding="utf-8")
    row = load_table(table, ["text", "label"], fix=["text"])[0]
    assert row == {"text": FIXED, "label": "a\u00e2\u20ac\u2122"}  # only the named columns
    src, tgt = tmp_path / "s", tmp_path / "t"
    src.write_text(BROKEN + "\n", encoding="utf-8")
    tgt.write_text("Gr\u00c3\u00bcn\n", encoding="utf-8")
    assert load_parallel(src, tgt, fix=True)[0] == {"src": FIXED, "tgt": "Grün"}


def test_what_ftfy_alone_leaves_broken_is_repaired():
    # a closing quote that lost its last byte, and mojibake lowercased after it broke
    assert clean_text("\u00e2\u20ac\u0153hi!\u00e2\u20ac she said") == "\u201chi!\u201d she said"
    assert clean_text("una mu\u00e3\u00b1eca") == "una muñeca"
    assert clean_text("„Hallo“, sagt er") == "„Hallo“, sagt er"  # German quotes are not mojibake


def test_the_card_names_the_repair():
    assert text_fix_note(True).startswith("ftfy ") and text_fix_note(False) == "none"
