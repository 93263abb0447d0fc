"""Server-Sent Events: `data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`.

NOTE: the chunk iterator is always closed (aclose) when the response ends, by
completion, error or client disconnect, so its `finally` blocks run at once and
abort the engine requests behind it; a dropped stream never keeps KV blocks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from lmservice.api.errors import APIError, error_body, from_engine_error
from lmservice.api.middleware import record_of
from lmservice.engine.outputs import EngineRequestError, QueueFullError

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def encode_event(payload: dict[str, Any]) -> bytes:
    # Compact JSON never contains a raw newline, so one event is exactly one `data:` line.
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _ignore(err: APIError) -> None:
    pass


async def sse_frames(chunks: AsyncIterator[dict[str, Any]],
                     on_error: Callable[[APIError], None] = _ignore) -> AsyncIterator[bytes]:
    """Frame JSON chunks as SSE. An error after the headers went out cannot change the status code,
    so it travels as one `data: {"error": ...}` event (what OpenAI-compatible clients expect), then [DONE];
    `on_error` is told of it."""
    async with aclosing(chunks):
        try:
            async for chunk in chunks:
                yield encode_event(chunk)
        except (APIError, EngineRequestError, QueueFullError, ValueError) as e:
            err = e if isinstance(e, APIError) else from_engine_error(e)
            on_error(err)
            yield encode_event(error_body(err.status, err.message, err.param, err.code))
    yield DONE


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` whose iterator is closed deterministically and `on_close` always called
    (see module note); an error event is noted in the request's record."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[dict[str, Any]], on_close: Callable[[], None]) -> None:
        self._error: APIError | None = None
        super().__init__(sse_frames(chunks, self._failed),
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    def _failed(self, err: APIError) -> None:
        self._error = err

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completed = False

        async def send_tracking(message: Message) -> None:
            nonlocal completed
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True

        try:
            async with aclosing(self.body_iterator):  # type: ignore[type-var]
                await super().__call__(scope, receive, send_tracking)
        finally:
            record = record_of(scope)
            if not completed:  # the client left before the end: counted and logged as 499, not 200
                record.client_disconnected = True
            if self._error is not None:
                record.error, record.error_status = self._error.message, self._error.status
            # Also when the stream never started (client gone before the first byte).
            self._on_close()
