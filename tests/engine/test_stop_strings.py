"""The stop-string automaton against the obvious search, and its per-character cost."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lmservice.engine.stop_strings import StopStrings


def first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Slow and obviously right: the stop string that ends first in `text` (longest on a tie)."""
    for end in range(1, len(text) + 1):
        found = [s for s in stops if text[:end].endswith(s)]
        if found:
            return end, max(found, key=len)
    return None


def longest_held_suffix(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(1, min(len(s), len(text)) + 1) if s.startswith(text[-k:])),
               default=0)


@settings(max_examples=200, deadline=None)
@given(stops=st.lists(st.text("abc", min_size=1, max_size=5), min_size=1, max_size=6),
       pieces=st.lists(st.text("abcd", max_size=4), max_size=12))
def test_finds_what_a_full_search_finds_fed_in_any_pieces(stops, pieces):
    automaton = StopStrings(stops)
    state, fed, found = 0, "", None
    for piece in pieces:
        while piece and found is None:
            state, used, stop = automaton.feed(state, piece)
            fed += piece[:used]
            piece = piece[used:]
            if stop is not None:
                found = (len(fed), stop)
        if found is not None:
            break
        # what a stream must hold back: the longest suffix that may still begin a stop string
        assert automaton.depth[state] == longest_held_suffix(fed, stops)
    assert found == first_stop(fed, stops)


def test_passes_over_a_match_when_asked_to_go_on():
    automaton = StopStrings(["ab", "b"])
    state, used, stop = automaton.feed(0, "xab")
    assert (used, stop) == (3, "ab")  # "b" ends at the same character; the longer one wins
    state, used, stop = automaton.feed(state, "cb")
    assert (used, stop) == (2, "b")


def test_many_stop_strings_cost_no_more_per_character():
    """Failure links followed over a text are at most its length (each is paid for by an earlier
    step forward), whatever the number of stop strings: count them."""

    class CountingList(list):
        reads = 0

        def __getitem__(self, i):
            CountingList.reads += 1
            return super().__getitem__(i)

    stops = [f"stop-{i:05d}-" + "x" * 60 for i in range(2000)]
    automaton = StopStrings(stops)
    automaton.fail = CountingList(automaton.fail)
    text = "the quick brown fox jumps over the lazy dog, stop-0 stop-00 stop-0001 " * 20
    state, used, stop = automaton.feed(0, text)
    assert stop is None and used == len(text)
    assert 0 < CountingList.reads <= len(text)
