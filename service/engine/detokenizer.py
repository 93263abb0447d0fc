"""Incremental detokenization with stop strings.

Text is released only when it is final: never half of a multi-byte character
(the tokenizer's DecodeStream buffers incomplete UTF-8), and never the start of
a possible stop string (the last len(longest stop) - 1 characters are held back
until the sequence ends or they can no longer begin a stop string).
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str], include_stop_str: bool, skip_special_tokens: bool) -> None:
        self._backend = tokenizer.backend_tokenizer  # tokenizers.Tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.stop = stop
        self.include_stop_str = include_stop_str
        self._max_stop = max((len(s) for s in stop), default=0)
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
        old_len = len(self.text)
        self.text += piece
        if not self.stop or not check_stop:
            return None
        search_from = max(0, old_len - self._max_stop + 1)
        best = None
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return None
        at, s = best
        self.text = self.text[: at + len(s)] if self.include_stop_str else self.text[:at]
        return s

    def take_delta(self, finished: bool) -> str:
        """New final text since the last call. At the end, bytes that never formed a whole
        character come out as U+FFFD, as the tokenizer's own decode gives them."""
        if finished and self._undecoded:
            self._append(self._backend.decode(self._undecoded, skip_special_tokens=self.skip_special_tokens), True)
            self._undecoded.clear()
        end = len(self.text)
        if not finished and self._max_stop > 1:
            end = max(self._emitted, end - (self._max_stop - 1))
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta
