"""`lmservice batch`: an OpenAI batch input file run through the server's own app, in this process.

Each request line is sent to the very FastAPI app `lmservice serve` runs (create_app, on the engine and
models build_serving makes from the same Settings), as an ASGI call inside this process (inprocess.py): no
socket, but the same middleware, body-size limit, API-key check, pydantic validation, limits, routes, error
handlers and status codes as the server. That is the one code path. Calling the route functions or the
engine directly, as vLLM's run-batch calls its serving objects, would need a copy of what the app does
around them (the 413 check, the 422 rendering, the exception handlers), and a copy drifts; a server in a
subprocess would add a process to manage and a socket per line for nothing. What the ASGI call costs is
small beside a request's engine time (docs/benchmarks.md measures the batch beside the server). The app's
lifespan runs around the batch, so the engine thread starts and stops as it does in a server.

Up to `concurrency` lines are in the app at once, so that continuous batching fills the engine's steps as
concurrent clients do. Each answered line is appended to the output file as it completes (in completion
order; custom_id says which request it answers) and the file is fsynced every second: a kill loses at most
the lines in flight, and a rerun with the same files skips every line the output already answers
(lmservice/batch/files.py says how lines are matched).

Left to the batch, not the server: the envelope of each line (files.py), a 429 (the queue was full
because of this batch's own lines: the line waits for one of them to finish and is sent again; a request
too big for an empty queue keeps its 429), and a 503 (the engine stopped: the run stops, leaving the line
unanswered for a rerun). SIGINT or SIGTERM stops taking lines, lets those in flight finish and exits 1; a
second signal ends the process at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from lmservice.api.app import TracingUnavailableError, create_app, open_tracing
from lmservice.api.jsonlog import configure_logging
from lmservice.batch import DEFAULT_CONCURRENCY
from lmservice.batch.files import (
    BatchRequest,
    LineError,
    OutputFile,
    OutputFileError,
    error_record,
    planned,
    read_finished,
    response_record,
)
from lmservice.batch.inprocess import Answer, post
from lmservice.batch.progress import Progress, ProgressLine
from lmservice.config import Settings

logger = logging.getLogger(__name__)


class Dispatcher:
    """Sends the planned lines through the app, `concurrency` at a time, and writes one record per line.
    Invariant: a record is written only for a line the server answered (or whose envelope failed); a line
    taken but not answered when the run stops leaves nothing behind, so a rerun sends it again."""

    def __init__(self, app: FastAPI, headers: dict[str, str], output: OutputFile, progress: Progress) -> None:
        self.app, self.headers, self.output, self.progress = app, headers, output, progress
        self.is_stopping = False
        self._num_busy = 0  # lines inside the app now
        self._num_admitted = 0  # answers other than 429: lines that had their turn in the engine
        self._changed = asyncio.Condition()  # notified after every answer

    async def run(self, items: Iterator[BatchRequest | LineError], concurrency: int) -> None:
        await asyncio.gather(*(self._worker(items) for _ in range(concurrency)))

    def stop(self) -> None:
        self.is_stopping = True

    async def _worker(self, items: Iterator[BatchRequest | LineError]) -> None:
        # One iterator shared by every worker: each line is taken by exactly one.
        for item in items:
            if self.is_stopping:
                return
            record = error_record(item) if isinstance(item, LineError) else await self._send(item)
            if record is None:
                return
            self.output.append(record)
            self.progress.count(record)
            if self.output.sync_due():
                await asyncio.to_thread(self.output.sync)

    async def _send(self, item: BatchRequest) -> dict[str, Any] | None:
        """The server's answer to one line as a record; None when the engine has stopped."""
        content = json.dumps(item.body).encode()
        while True:
            seen = self._num_admitted
            answer = await self._post(item.url, content)
            if answer.status == 503:
                logger.error("the engine stopped; stopping the batch", extra={"answer": answer.json()})
                self.stop()
                return None
            if answer.status != 429 or self._num_busy == 0:
                break
            # The queue is full of this batch's own lines: send it again once one of them is done, or none is
            # left in the app (then a second 429 is this line's own: too big for an empty queue).
            async with self._changed:
                await self._changed.wait_for(lambda seen=seen: self._num_admitted > seen or self._num_busy == 0)
        return response_record(item.custom_id, answer.status, answer.headers.get("x-request-id"), answer.json())

    async def _post(self, url: str, content: bytes) -> Answer:
        self._num_busy += 1
        status = None
        try:
            answer = await post(self.app, url, content, self.headers)
            status = answer.status
            return answer
        finally:
            self._num_busy -= 1
            if status != 429:
                self._num_admitted += 1
            async with self._changed:
                self._changed.notify_all()


async def _run_app(app: FastAPI, settings: Settings, items: Iterator[BatchRequest | LineError], concurrency: int,
                   output: OutputFile, progress: Progress) -> Dispatcher:
    headers = {"authorization": f"Bearer {settings.api_key[0]}"} if settings.api_key else {}
    loop = asyncio.get_running_loop()
    progress_line = ProgressLine(progress)
    async with app.router.lifespan_context(app):
        dispatcher = Dispatcher(app, headers, output, progress)

        def on_signal() -> None:
            logger.info("signal: finishing the lines in flight, then stopping (a second signal ends at once)")
            dispatcher.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        progress.started_at = time.monotonic()  # the engine is up: the rates count from here
        ticker = asyncio.ensure_future(_tick(progress_line))
        try:
            await dispatcher.run(items, concurrency)
        finally:
            ticker.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            progress_line.end()
    return dispatcher


async def _tick(progress_line: ProgressLine) -> None:
    while True:
        await asyncio.sleep(progress_line.interval_s)
        progress_line.show()


def run(settings: Settings, input_path: Path, output_path: Path, concurrency: int = DEFAULT_CONCURRENCY) -> int:
    """Answer every line of `input_path` not yet answered in `output_path`. Exit status: 0 when every line
    is answered (per-line errors included), 1 when the model cannot load, tracing is asked for without the
    otel extra, or the run stopped early (a signal, the engine failing), 2 for unusable files or flags."""
    if concurrency < 1:
        return _usage_error(f"--concurrency must be at least 1, got {concurrency}")
    if not input_path.is_file():
        return _usage_error(f"input file {input_path} does not exist")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        return _usage_error("the output file must not be the input file")
    try:
        finished = read_finished(output_path)
    except (OutputFileError, OSError) as e:
        return _usage_error(str(e))
    progress = Progress(num_todo=sum(1 for _ in planned(input_path, finished)), num_skipped=finished.num_records)
    if progress.num_todo == 0:
        print(progress.summary(True), flush=True)
        return 0
    configure_logging(settings.log_level)
    if settings.log_level != "debug":  # the app's access log has a line per request: noise here
        logging.getLogger("lmservice.access").setLevel(logging.WARNING)
    try:
        tracing = open_tracing(settings)  # as `serve` does: before the model loads, and a span per request
    except TracingUnavailableError as e:
        logger.error("cannot trace", extra={"error": str(e)})
        return 1
    from lmservice.serving.bootstrap import build_serving  # here: torch and the model only when running

    try:
        output = OutputFile(output_path)
    except OSError as e:
        return _usage_error(f"cannot write {output_path}: {e.strerror}")
    with contextlib.closing(output):
        try:
            serving = build_serving(settings)
        except (ValueError, OSError) as e:  # as `lmservice serve`: a model or adapter that cannot be loaded
            logger.error("cannot load the model", extra={"error": str(e)})
            return 1
        try:
            dispatcher = asyncio.run(_run_app(create_app(settings, serving, tracing=tracing), settings,
                                              planned(input_path, finished), concurrency, output, progress))
        except KeyboardInterrupt:  # a second SIGINT: what is written stays written
            print(progress.summary(False), flush=True)
            return 130
    is_complete = not dispatcher.is_stopping and progress.num_done == progress.num_todo
    print(progress.summary(is_complete), flush=True)
    return 0 if is_complete else 1


def _usage_error(message: str) -> int:
    print(f"lmservice batch: {message}", file=sys.stderr)
    return 2
