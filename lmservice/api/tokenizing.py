"""Text -> token ids for the routes, without stalling the event loop.

Tokenizing a text costs time in proportion to its length, and the tokenizer's encode holds the GIL
(measured: a 1 MB text held the loop for 0.4 s of its 0.6 s even from a worker thread), so a thread alone
cannot keep /health answering. Two bounds together do:

- a cheap length check first: a text of more than `max_model_len x max_token_bytes` characters has more
  tokens than the model's context (no token covers more bytes than the vocabulary's longest, and a
  character is at least one byte), so it is refused (400) without being tokenized;
- what passes is tokenized in a small thread pool (`NUM_WORKERS`), with chat templates rendered there too,
  so the pure-Python part never runs on the loop and at most that many encodes run at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lmservice.api.errors import APIError

T = TypeVar("T")

NUM_WORKERS = 2


def longest_token_bytes(tokenizer: Any) -> int:
    """An upper bound on the bytes of text one token covers: the longest vocabulary entry in UTF-8
    (byte-level BPE writes each byte as one character of one or two UTF-8 bytes, so this over-counts,
    which keeps the bound safe)."""
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    return max((len(token.encode()) for token in vocab), default=1)


class PromptTokenizer:
    """The routes' tokenizer: length-checked, off the loop (see module docstring)."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_text_chars = max_model_len * longest_token_bytes(tokenizer)
        self._pool = ThreadPoolExecutor(max_workers=NUM_WORKERS, thread_name_prefix="lmservice-tokenize")

    def check_length(self, text: str, param: str) -> None:
        """400 naming `param` when `text` cannot fit in the context (O(1): no tokenizing)."""
        if len(text) > self.max_text_chars:
            raise APIError(400, f"{param}: the text has {len(text)} characters: more tokens than the model's "
                                f"context of {self.max_model_len} can hold (at most {self.max_text_chars} "
                                f"characters)", param=param)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def encode(self, texts: list[str], param: str, add_special_tokens: bool = False) -> list[list[int]]:
        for text in texts:
            self.check_length(text, param)
        return await self.run(lambda: [self.tokenizer.encode(t, add_special_tokens=add_special_tokens)
                                        for t in texts])

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
