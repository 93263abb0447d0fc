"""One HTTP request to an ASGI app inside this process: the scope, `receive` and `send` a server would give it,
and the answer collected whole.

Our own ~40 lines rather than httpx's ASGITransport: httpx is not a dependency of the installed package, and
a batch needs nothing of a client but this (no redirects, cookies or streaming).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message

from lmservice.api.errors import error_body

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        """The body as JSON (every answer of our app is JSON); as text when it is not."""
        try:
            return json.loads(self.body)
        except ValueError:
            return self.body.decode("utf-8", "replace")


async def post(app: ASGIApp, path: str, body: bytes, headers: dict[str, str]) -> Answer:
    """POST `body` to `path` as a client on a socket would: with its Content-Length, in one piece; the
    connection stays open until the answer is complete (a route that watches for a disconnect sees none)."""
    sent = {"content-type": "application/json", **headers, "content-length": str(len(body))}
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in sent.items()],
             "client": None, "server": None}
    status, answer_headers, parts = 500, {}, []
    is_complete = asyncio.Event()
    is_body_sent = False

    async def receive() -> Message:
        nonlocal is_body_sent
        if not is_body_sent:
            is_body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await is_complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, answer_headers
        if message["type"] == "http.response.start":
            status = message["status"]
            answer_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                is_complete.set()

    try:
        await app(scope, receive, send)
    except Exception:  # noqa: BLE001 (Starlette re-raises an unhandled error after answering it with a 500)
        if not is_complete.is_set():
            logger.exception("the app failed without an answer", extra={"path": path})
            return Answer(500, {"content-type": "application/json"},
                          json.dumps(error_body(500, "internal server error")).encode())
    finally:
        is_complete.set()
    return Answer(status, answer_headers, b"".join(parts))
