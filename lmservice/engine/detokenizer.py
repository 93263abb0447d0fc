"""Incremental detokenization with stop strings.

Text is released only when it is final: never half of a multi-byte character
(the tokenizer's DecodeStream buffers incomplete UTF-8), and never the start of
a possible stop string (the text's longest suffix that begins a stop string is
held back until the sequence ends or it can no longer begin one).
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from lmservice.engine.stop_strings import StopStrings


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stops: StopStrings | None, include_stop_str: bool,
                 skip_special_tokens: bool) -> None:
        self._backend = tokenizer.backend_tokenizer  # tokenizers.Tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stops = stops  # shared by the request's sequences; the state below is this sequence's
        self._stop_state = 0
        self.include_stop_str = include_stop_str
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._emitted = 0
        self._undecoded: list[int] = []  # tokens the stream holds back (an incomplete UTF-8 character so far)

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Feed one token; returns the stop string when one now appears in the text
        (not looked for while check_stop is False: min_tokens not reached yet)."""
        piece = self._stream.step(self._backend, token_id)
        if piece is None:
            self._undecoded.append(token_id)
            return None
        self._undecoded.clear()
        return self._append(piece, check_stop)

    def _append(self, piece: str, check_stop: bool) -> str | None:
        if not piece:
            return None
        if self._stops is None:
            self.text += piece
            return None
        # Every character goes through the automaton once; a stop string completed while
        # check_stop is False (min_tokens not reached) is passed over.
        while piece:
            self._stop_state, used, stop = self._stops.feed(self._stop_state, piece)
            self.text += piece[:used]
            piece = piece[used:]
            if stop is not None and check_stop:
                if not self.include_stop_str:
                    self.text = self.text[: len(self.text) - len(stop)]
                return stop
        return None

    def take_delta(self, finished: bool) -> str:
        """New final text since the last call. At the end, bytes that never formed a whole
        character come out as U+FFFD, as the tokenizer's own decode gives them."""
        if finished and self._undecoded:
            self._append(self._backend.decode(self._undecoded, skip_special_tokens=self.skip_special_tokens), True)
            self._undecoded.clear()
        end = len(self.text)
        if not finished and self._stops is not None:
            end = max(self._emitted, end - self._stops.depth[self._stop_state])
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta
