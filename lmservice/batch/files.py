"""The batch file formats: input lines checked as envelopes, output records, and what an output file already
holds (for resuming).

Input, one JSON object a line (OpenAI's batch input format):

    {"custom_id": "q1", "method": "POST", "url": "/v1/completions", "body": {...}}

Only the envelope is checked here (a JSON object; custom_id a non-empty string; method POST; a supported
url; body an object; no `"stream": true`, since a batch answers whole responses). The body is the
server's to judge: it goes through the app unchanged.

Output, one record a line (OpenAI's batch output format):

    {"id": "batch_req_…", "custom_id": "q1", "response": {"status_code": 200, "request_id": "…", "body": {...}},
     "error": null}

A request the server answered has `response` (whatever its status) and `error: null`; a line that never
reached the server has `response: null` and `error: {"code", "message", "line"}`, `line` being its line
number in the input file (1-based).

Resuming: a line is done when the output holds its record, by custom_id, or, for a line without a usable
custom_id or a duplicate one, by its line number (`error.line`). A custom_id belongs to the first input line
that carries it, whatever else is wrong with that line; a later line with the same id is a
`duplicate_custom_id` error and never runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_URLS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/translate")
DUPLICATE = "duplicate_custom_id"


class OutputFileError(Exception):
    """The output file holds something that is not a batch output record (it is not ours to overwrite)."""


@dataclass(frozen=True)
class BatchRequest:
    """An input line whose envelope is sound: its body goes to the app as a POST to `url`."""

    line_number: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class LineError:
    """An input line that is not a request to send; it is answered by one error record."""

    line_number: int
    custom_id: str | None
    code: str
    message: str


def parse_line(line_number: int, raw: bytes) -> BatchRequest | LineError:
    """One input line (without its newline) checked as an envelope; never raises."""
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return LineError(line_number, None, "invalid_json_line", f"line {line_number}: not JSON ({e})")
    if not isinstance(entry, dict):
        return LineError(line_number, None, "invalid_json_line", f"line {line_number}: not a JSON object")
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        problem = "missing" if custom_id is None else "must be a non-empty string"
        code = "missing_required_parameter" if custom_id is None else "invalid_parameter"
        return LineError(line_number, None, code, f"line {line_number}: custom_id: {problem}")

    def error(code: str, message: str) -> LineError:
        return LineError(line_number, custom_id, code, f"line {line_number}: {message}")

    for name in ("method", "url", "body"):
        if name not in entry:
            return error("missing_required_parameter", f"{name}: missing")
    method, url, body = entry["method"], entry["url"], entry["body"]
    if method != "POST":
        return error("unsupported_method", f"method: must be POST, got {method!r}")
    if url not in SUPPORTED_URLS:
        return error("unsupported_url", f"url: {url!r} is not one of {', '.join(SUPPORTED_URLS)}")
    if not isinstance(body, dict):
        return error("invalid_parameter", "body: must be a JSON object")
    if body.get("stream") is True:
        return error("streaming_unsupported", "body.stream: a batch answers whole responses; leave stream out")
    return BatchRequest(line_number, custom_id, url, body)


def response_record(custom_id: str, status_code: int, request_id: str | None, body: Any) -> dict[str, Any]:
    return {"id": _record_id(), "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body}, "error": None}


def error_record(err: LineError) -> dict[str, Any]:
    return {"id": _record_id(), "custom_id": err.custom_id, "response": None,
            "error": {"code": err.code, "message": err.message, "line": err.line_number}}


def _record_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


@dataclass
class Finished:
    """What an output file already answers (see the module docstring for the rule)."""

    custom_ids: set[str] = field(default_factory=set)
    line_numbers: set[int] = field(default_factory=set)
    num_records: int = 0

    def add(self, record: dict[str, Any]) -> None:
        self.num_records += 1
        err = record.get("error")
        if isinstance(err, dict) and isinstance(err.get("line"), int):
            self.line_numbers.add(err["line"])
        is_duplicate = isinstance(err, dict) and err.get("code") == DUPLICATE
        if isinstance(record.get("custom_id"), str) and not is_duplicate:
            self.custom_ids.add(record["custom_id"])

    def covers(self, item: BatchRequest | LineError) -> bool:
        if item.custom_id is not None and not (isinstance(item, LineError) and item.code == DUPLICATE):
            return item.custom_id in self.custom_ids
        return item.line_number in self.line_numbers


def read_finished(path: Path) -> Finished:
    """The records already in `path` (none if it does not exist). A torn tail (a last line cut short by a
    kill, or lines after it that are not records either) is truncated away; a line that is not a record
    followed by one that is raises OutputFileError: that file was not written by a batch run alone."""
    finished = Finished()
    if not path.exists():
        return finished
    with open(path, "r+b") as f:
        offset, torn_at = 0, None
        for number, line in enumerate(f, start=1):
            record = _record(line)
            if record is None:
                torn_at = offset if torn_at is None else torn_at
            elif torn_at is not None:
                raise OutputFileError(f"{path}: a line before line {number} is not a batch output record")
            else:
                finished.add(record)
            offset += len(line)
        if torn_at is not None:
            f.truncate(torn_at)
    return finished


def _record(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "custom_id" in record and "id" in record else None


def planned(path: Path, finished: Finished) -> Iterator[BatchRequest | LineError]:
    """The input lines still to answer, in file order: requests to send and errors to write. Blank lines
    are skipped; duplicate custom_ids become errors (module docstring)."""
    claimed: set[str] = set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            item = parse_line(number, raw)
            if item.custom_id is not None:
                if item.custom_id in claimed:
                    item = LineError(number, item.custom_id, DUPLICATE,
                                     f"line {number}: custom_id {item.custom_id!r} is already used by an earlier line")
                claimed.add(item.custom_id)
            if not finished.covers(item):
                yield item


def count_lines(path: Path) -> int:
    """Non-blank lines of the input file (the progress line's total)."""
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip())


class OutputFile:
    """Append-only writer of output records on an O_APPEND descriptor (no user-space buffer). Invariant: the
    file is whole records, then at most one torn last line (read_finished trims it). A record is written
    by `os.write` calls repeated until every byte is out (a write may be partial); a kill mid-record leaves
    the torn last line, and a failed write (ENOSPC, EIO) truncates the file back to the end of the last
    whole record and refuses every later append, so no record ever follows a torn line. `sync` is due
    every `sync_interval_s` and runs at close, bounding what a power loss can take."""

    def __init__(self, path: Path, sync_interval_s: float = 1.0) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.sync_interval_s = sync_interval_s
        self._last_sync = time.monotonic()
        self._end: int | None = os.fstat(self.fd).st_size  # where the last whole record ends; None: broken

    def append(self, record: dict[str, Any]) -> None:
        """Write one record whole, or raise OSError having written nothing that stays (see the class)."""
        if self._end is None:
            raise OSError(errno.EIO, "an earlier write to the output file failed")
        # NOTE: ensure_ascii=False keeps text readable; a lone surrogate (legal in JSON input, not in UTF-8)
        # cannot occur outside a JSON string there, and backslashreplace writes it as its own JSON escape.
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError:
            end, self._end = self._end, None
            with contextlib.suppress(OSError):  # if even this fails, the torn line is the last: trimmed on resume
                os.ftruncate(self.fd, end)
            raise
        self._end += len(data)

    def sync_due(self) -> bool:
        """True at most once per interval (claiming it): the caller then runs `sync`, off the event loop."""
        now = time.monotonic()
        if now - self._last_sync < self.sync_interval_s:
            return False
        self._last_sync = now
        return True

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
