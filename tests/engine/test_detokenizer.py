"""lmservice/engine/detokenizer.py: text released only when final (whole characters, no stop-string prefix)."""

from __future__ import annotations

from lmservice.engine.detokenizer import IncrementalDetokenizer
from lmservice.engine.stop_strings import StopStrings


def test_stop_string_in_bytes_flushed_at_the_end(tiny_engine):
    tokenizer = tiny_engine().tokenizer
    detok = IncrementalDetokenizer(tokenizer, StopStrings(["0"]), False, True)
    # two stray bytes, then the token '0' + a lead byte: all held back until the end
    held = [t for t in range(256, 1000) if tokenizer.convert_ids_to_tokens(t) in ("0Ã", "0Ä", "0Å")][:1]
    assert held, "the test tokenizer has a '0' + lead-byte token"
    for t in [250, 180, *held]:
        assert detok.add_token(t) is None
    assert "0" not in detok.take_delta(finished=True)
