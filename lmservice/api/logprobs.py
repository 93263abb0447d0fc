"""Logprobs in the three shapes clients expect: OpenAI legacy completions, OpenAI chat, and native."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmservice.engine.outputs import TokenLogprob


class TokenText:
    """Text of single tokens, cached (the vocabulary is fixed for the life of the server).

    A token that holds part of a multi-byte character decodes to U+FFFD on its own;
    that is what OpenAI's API shows too (its chat shape adds the raw `bytes`).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def completion_logprobs(token_text: TokenText, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob | None],
                        text_offset: int = 0) -> dict[str, Any]:
    """OpenAI legacy shape; `logprobs[i]` None (the first prompt token) gives null entries."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = text_offset
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        text = token_text(token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        token_logprobs.append(None if lp is None else lp.logprob)
        top.append(None if lp is None else {token_text(t): v for t, v in lp.top})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(token_text: TokenText, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def native_logprobs(token_text: TokenText, logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": token_text(lp.token_id), "token_id": lp.token_id, "logprob": lp.logprob,
             "top": [{"token": token_text(t), "logprob": v} for t, v in lp.top]} for lp in logprobs]
