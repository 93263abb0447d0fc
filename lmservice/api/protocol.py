"""The HTTP/1.1 connection that `lmservice serve` runs: uvicorn's httptools protocol with bounds on what a
client may make the server hold or wait for.

Which implementation runs: always httptools (llhttp). server.py passes this class to uvicorn as `http=`,
so uvicorn's own choice (httptools when installed, else h11) never applies. httptools has no limit of its
own on header sizes (its parser grows a header line in memory for as long as the client sends it, 8 MB
values and 20,000 headers were accepted) and uvicorn offers no knob for it (h11's
`h11_max_incomplete_event_size` does not reach httptools); nor does either have a body-read timeout. So the
bounds are enforced here, on the bytes as they arrive, before the parser sees them:

- the request head (request line + header lines): at most `max_header_bytes` in all, `max_headers` header
  fields, and no line over `max_header_line_bytes` (a request line over it: 414; any other bound: 431),
  refused with one JSON error and the connection closed as soon as a chunk crosses the bound, so a
  slowly streamed huge line costs at most one read buffer;
- `header_read_timeout_s`: the head must be complete this long after the connection opens (or after the
  previous request ended); else the connection is closed without an answer;
- `body_read_timeout_s`: the body must be complete this long after the head; else 408 (when no answer has
  started) and the connection is closed; the route sees a disconnect.

NOTE: the scan follows the parser: a head is scanned from the first read after the previous request's body
until the parser has its headers. A client that pipelines a request in the same read as the previous body
gets that read (at most 256 KiB) past the scan, which still bounds what the parser can hold; every later
read of that head is counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lmservice.api.errors import error_body
from lmservice.config import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    """What one connection may send (see module docstring); from the settings of the same names."""

    max_header_line_bytes: int
    max_header_bytes: int
    max_headers: int
    header_read_timeout_s: float
    body_read_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


class _HeadScan:
    """Counts one request head as its bytes arrive. Invariant: `is_open` until the empty line that ends
    the head has been seen; the counts cover every byte scanned since the head began."""

    def __init__(self) -> None:
        self.is_open = True
        self.num_bytes = 0
        self.num_lines = 0  # complete non-empty lines: the request line, then one per header field
        self.line_bytes = 0  # of the line in progress, without its "\n"
        self.line_start = b""  # its first two bytes (an empty line is "" or "\r")

    def feed(self, data: bytes, limits: HttpLimits) -> tuple[int, str] | None:
        """Scan `data` up to the end of the head; (status, message) when it crosses a bound, else None."""
        pos = 0
        while self.is_open:
            newline = data.find(b"\n", pos)
            end = len(data) if newline < 0 else newline
            if len(self.line_start) < 2:
                self.line_start += data[pos:min(end, pos + 2 - len(self.line_start))]
            self.line_bytes += end - pos
            self.num_bytes += end - pos + (newline >= 0)
            if self.line_bytes > limits.max_header_line_bytes:
                if self.num_lines == 0:
                    return 414, f"the request line is longer than {limits.max_header_line_bytes} bytes"
                return 431, f"a header line is longer than {limits.max_header_line_bytes} bytes"
            if self.num_bytes > limits.max_header_bytes:
                return 431, f"the request headers are larger than {limits.max_header_bytes} bytes"
            if newline < 0:
                return None
            is_empty = self.line_bytes == 0 or (self.line_bytes == 1 and self.line_start == b"\r")
            if is_empty and self.num_lines > 0:
                self.is_open = False  # what follows is the body
            elif not is_empty:
                self.num_lines += 1
                if self.num_lines - 1 > limits.max_headers:
                    return 431, f"more than {limits.max_headers} header fields"
            self.line_bytes, self.line_start, pos = 0, b"", newline + 1
        return None


def _error_response(status: int, message: str) -> bytes:
    body = json.dumps(error_body(status, message)).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def limited_protocol(limits: HttpLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with `limits` enforced (see module docstring)."""

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _scan: _HeadScan | None = None
        _refused = False

        # --- timers: one at a time (the head's, then the body's) ---
        def _arm(self, timeout_s: float, on_expiry) -> None:
            self._disarm()
            self._timer = self.loop.call_later(timeout_s, on_expiry)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _head_too_slow(self) -> None:
            self._timer = None
            logger.info("closing a connection: request headers not received in time",
                        extra={"header_read_timeout_s": limits.header_read_timeout_s})
            self.transport.close()

        def _body_too_slow(self) -> None:
            self._timer = None
            logger.info("closing a connection: request body not received in time",
                        extra={"body_read_timeout_s": limits.body_read_timeout_s})
            self._refuse(408, f"the request body did not arrive within {limits.body_read_timeout_s} s")

        def _refuse(self, status: int, message: str) -> None:
            """Answer `status` (unless an answer is already under way) and close the connection."""
            self._refused = True
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(_error_response(status, message))
            self.transport.close()

        # --- uvicorn's protocol ---
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._scan = _HeadScan()
            self._arm(limits.header_read_timeout_s, self._head_too_slow)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._timer is None:  # the next request on a kept-alive connection: its head's clock starts
                self._arm(limits.header_read_timeout_s, self._head_too_slow)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._scan is not None and self._scan.is_open:
                refusal = self._scan.feed(data, limits)
                if refusal is not None:
                    logger.info("refusing a request head", extra={"status": refusal[0], "reason": refusal[1]})
                    self._refuse(*refusal)
                    return
            super().data_received(data)

        def on_headers_complete(self) -> None:
            if self._scan is not None:  # the parser is in the body now, even where the scan did not see the head
                self._scan.is_open = False
            self._arm(limits.body_read_timeout_s, self._body_too_slow)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            self._scan = _HeadScan()  # the next bytes are the next request's head
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return LimitedHttpToolsProtocol
