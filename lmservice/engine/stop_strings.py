"""Stop strings found in streamed text at a cost per character that does not grow with their number.

One Aho-Corasick automaton per request (shared by its n sequences), fed each new
character once: a request with thousands of stop strings costs the engine step
no more than one with a single stop string. (Searching every stop string in the
text's tail on every token made one such request slow every other client's.)
"""

from __future__ import annotations

from collections import deque


class StopStrings:
    """The automaton of a request's stop strings: immutable once built, O(total length) to build.

    State 0 is the root. Invariant: `depth[s]` is the length of the string that leads to state s,
    so after feeding a text, depth[state] is the length of the longest suffix of that text that is
    a prefix of some stop string: exactly the characters a stream must hold back.
    """

    def __init__(self, stops: list[str]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]
        self.word: list[str | None] = [None]  # the longest stop string that ends at this state
        for stop in stops:
            state = 0
            for ch in stop:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[state][ch] = nxt
                    self.goto.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.word.append(None)
                state = nxt
            self.word[state] = stop
        self.fail = [0] * len(self.goto)
        queue = deque(self.goto[0].values())
        while queue:  # breadth first: a state's failure link is computed from shallower states
            state = queue.popleft()
            if self.word[state] is None:  # a stop string that ends inside this one (the longest such)
                self.word[state] = self.word[self.fail[state]]
            for ch, nxt in self.goto[state].items():
                self.fail[nxt] = self._step(self.fail[state], ch) if state else 0
                queue.append(nxt)

    def _step(self, state: int, ch: str) -> int:
        while True:
            nxt = self.goto[state].get(ch)
            if nxt is not None:
                return nxt
            if state == 0:
                return 0
            state = self.fail[state]

    def feed(self, state: int, text: str) -> tuple[int, int, str | None]:
        """Advance from `state` over `text`; stops at the first character that completes a stop string.

        Returns (new state, characters consumed, the stop string or None). The stop string found is
        the one that ends first in the text; of those ending at the same character, the longest.
        """
        for i, ch in enumerate(text):
            state = self._step(state, ch)
            if self.word[state] is not None:
                return state, i + 1, self.word[state]
        return state, len(text), None
