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
because of this batch's own lines: the line waits its turn, one per line that finishes, and is sent again;
Dispatcher says how; a request larger than the queue's bounds on its own gets the server's 400), a 503 (the engine stopped: the
run stops, leaving the line unanswered for a rerun), and an output file that cannot be written (the run
stops; the file is cut back to its last whole record, so a rerun resumes from it). SIGINT or SIGTERM stops
taking lines, lets those in flight finish and exits 1; a second signal ends the process at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections import deque
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
    taken but not answered when the run stops leaves nothing behind, so a rerun sends it again.

    A 429 here means the waiting queue is full of this run's own lines (nothing else reaches the app). The
    refused line takes a turn in a FIFO; every answer other than a 429 (a line that had its turn in the
    engine: an admission) hands the next turn to the oldest waiting line alone, and a new line queues
    behind the waiting ones, so an admission costs at most one extra request through the app. A line
    refused while no other line was in the app keeps its 429. (A line larger than the bounds on its own
    never gets a 429: the engine answers it 400 at once. Being alone is the batch's own guard that no 429
    is retried for ever; the count in a 429's message cannot serve, as it leaves out the adds the engine
    thread has not yet taken.) A line refused again after its turn backs off, 1, 2, 4, ... admissions
    before it queues for a turn again, so no line is sent after every admission."""

    def __init__(self, app: FastAPI, headers: dict[str, str], output: OutputFile, progress: Progress) -> None:
        self.app, self.headers, self.output, self.progress = app, headers, output, progress
        self.is_stopping = False
        self.write_error: OSError | None = None  # the output could not be written: the run stopped
        self._num_busy = 0  # lines inside the app now
        self._num_posts = 0  # lines sent into the app so far (a post is alone when this does not move)
        self._num_admitted = 0  # answers other than 429
        self._admitted = asyncio.Condition()  # notified after each admission, for the lines backing off
        self._turns: deque[asyncio.Future[None]] = deque()  # lines waiting to be sent, oldest first

    async def run(self, items: Iterator[BatchRequest | LineError], concurrency: int) -> None:
        await asyncio.gather(*(self._worker(items) for _ in range(concurrency)))

    def stop(self) -> None:
        self.is_stopping = True
        while self._turns:  # the waiting lines are not in flight: woken, they leave unanswered for a rerun
            self._hand_turn()

    async def _worker(self, items: Iterator[BatchRequest | LineError]) -> None:
        # One iterator shared by every worker: each line is taken by exactly one, and none once stopping.
        while not self.is_stopping and (item := next(items, None)) is not None:
            record = error_record(item) if isinstance(item, LineError) else await self._send(item)
            if record is None or self.write_error is not None:
                return
            try:
                self.output.append(record)
            except OSError as e:  # the file was cut back to its last whole record (OutputFile)
                logger.error("cannot write the output file; stopping the batch", extra={"error": str(e)})
                self.write_error = e
                self.stop()
                return
            self.progress.count(record)
            if self.output.sync_due():
                await asyncio.to_thread(self.output.sync)

    async def _send(self, item: BatchRequest) -> dict[str, Any] | None:
        """The server's answer to one line as a record; None when the run stops before it is answered."""
        content = json.dumps(item.body).encode()
        if self._turns:  # behind the lines already waiting for room in the queue
            await self._wait_turn()
        num_refused = 0
        while not self.is_stopping:
            self.progress.num_retries += num_refused > 0
            answer, is_alone = await self._post(item.url, content)
            if answer.status == 503:
                logger.error("the engine stopped; stopping the batch", extra={"answer": answer.json()})
                self.stop()
                return None
            if answer.status != 429 or is_alone:
                break
            num_refused += 1
            if num_refused > 1:  # refused after its turn: maybe too big for any queue (class docstring)
                await self._wait_admissions(2 ** (num_refused - 2))
            await self._wait_turn()
        else:
            return None
        return response_record(item.custom_id, answer.status, answer.headers.get("x-request-id"), answer.json())

    async def _post(self, url: str, content: bytes) -> tuple[Answer, bool]:
        """The answer, and whether no other line was in the app at any time while this one was."""
        is_alone = self._num_busy == 0
        self._num_busy += 1
        self._num_posts += 1
        num_posts = self._num_posts
        status = None
        try:
            answer = await post(self.app, url, content, self.headers)
            status = answer.status
            return answer, is_alone and self._num_posts == num_posts
        finally:
            self._num_busy -= 1
            if status != 429:
                self._num_admitted += 1
            if status != 429 or self._num_busy == 0:  # room, or no line left in the app to hand turns on
                self._hand_turn()
            async with self._admitted:
                self._admitted.notify_all()

    async def _wait_admissions(self, num_admissions: int) -> None:
        """Until `num_admissions` more lines are admitted, the app is empty, or the run stops."""
        target = self._num_admitted + num_admissions
        async with self._admitted:
            await self._admitted.wait_for(
                lambda: self._num_admitted >= target or self._num_busy == 0 or self.is_stopping)

    async def _wait_turn(self) -> None:
        turn = asyncio.get_running_loop().create_future()
        self._turns.append(turn)
        if self._num_busy == 0:  # no line in the app is left to finish and hand a turn on
            self._hand_turn()
        await turn

    def _hand_turn(self) -> None:
        while self._turns:
            turn = self._turns.popleft()
            if not turn.done():
                turn.set_result(None)
                return


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
    otel extra, or the run stopped early (a signal, the engine failing, the output file failing), 2 for unusable files or flags."""
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
