"""lmservice/batch/runner.py's Dispatcher on small stand-in apps (no model): a signal finishes exactly the
lines in flight, a full queue costs one extra request per finished line, a line too big for an empty queue
keeps its 429, and a failed write stops the run with the output cut back to whole records."""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import random
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from lmservice.batch.files import BatchRequest, OutputFile, read_finished
from lmservice.batch.progress import Progress
from lmservice.batch.runner import Dispatcher, _run_app
from lmservice.config import Settings

Handler = Callable[[str], Awaitable[JSONResponse]]


def _app(handle: Handler) -> FastAPI:
    """An app whose /v1/completions answers with `handle(body["prompt"])`."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        return await handle((await request.json())["prompt"])

    return app


def _lines(num_lines: int, taken: list[str] | None = None) -> Iterator[BatchRequest]:
    for i in range(num_lines):
        if taken is not None:
            taken.append(f"q{i}")
        yield BatchRequest(i + 1, f"q{i}", "/v1/completions", {"prompt": f"q{i}"})


def _run(app: FastAPI, items, concurrency: int, output_path: Path, progress: Progress,
         during: Callable[[], Awaitable[None]] | None = None) -> Dispatcher:
    async def main() -> Dispatcher:
        output = OutputFile(output_path)
        try:
            run = asyncio.ensure_future(_run_app(app, Settings(), items, concurrency, output, progress))
            if during is not None:
                await during()
            return await run
        finally:
            output.close()
    return asyncio.run(main())


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_sigterm_finishes_exactly_the_lines_in_flight(tmp_path):
    """The app holds every request until the signal has been handled: the lines inside it then are all
    answered and written, and no line is taken after it (dropping them would leave no record at all)."""
    concurrency, held, release = 3, [], asyncio.Event()
    all_in = asyncio.Event()

    async def hold(prompt: str) -> JSONResponse:
        held.append(prompt)
        if len(held) == concurrency:
            all_in.set()
        await release.wait()
        return JSONResponse({"text": f"answer to {prompt}"})

    async def signal_then_release() -> None:
        await asyncio.wait_for(all_in.wait(), 10)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.2)  # the loop runs its handler: the dispatcher stops taking lines
        release.set()

    taken: list[str] = []
    progress = Progress(num_todo=10)
    dispatcher = _run(_app(hold), _lines(10, taken), concurrency, tmp_path / "out.jsonl", progress,
                      during=signal_then_release)
    assert dispatcher.is_stopping
    assert taken == held == ["q0", "q1", "q2"]
    out = _records(tmp_path / "out.jsonl")
    assert sorted(r["custom_id"] for r in out) == held
    assert all(r["response"]["status_code"] == 200 for r in out)
    assert progress.num_done == concurrency


def _bounded_queue(capacity: int, refused: set[str] = frozenset(),
                   delay_s: Callable[[], float] = lambda: 0.005) -> tuple[Handler, Counter]:
    """A stand-in for the engine's waiting queue: at most `capacity` requests inside, the rest (and every
    prompt in `refused`, too big for it) answered 429 at once. Counts the requests of each prompt."""
    posts: Counter = Counter()
    inside = 0

    async def handle(prompt: str) -> JSONResponse:
        nonlocal inside
        posts[prompt] += 1
        if prompt in refused or inside >= capacity:
            return JSONResponse({"error": {"message": "waiting queue is full"}}, status_code=429)
        inside += 1
        try:
            await asyncio.sleep(delay_s())
        finally:
            inside -= 1
        return JSONResponse({"text": prompt})

    return handle, posts


def test_a_full_queue_costs_one_extra_request_per_finished_line(tmp_path):
    num_lines, concurrency = 40, 12
    handle, posts = _bounded_queue(capacity=2)
    progress = Progress(num_todo=num_lines)
    _run(_app(handle), _lines(num_lines), concurrency, tmp_path / "out.jsonl", progress)
    out = _records(tmp_path / "out.jsonl")
    assert len(out) == num_lines and all(r["response"]["status_code"] == 200 for r in out)
    num_refused = sum(posts.values()) - num_lines
    assert num_refused > 0 and progress.num_retries == num_refused  # every refused line was sent again
    # One turn per finished line, so at most one refusal per line (15 here); waking every waiting line
    # after each answer refuses 60, and re-sending all of them 170.
    assert num_refused <= num_lines, posts


def test_a_line_too_big_for_an_empty_queue_keeps_its_429(tmp_path):
    handle, posts = _bounded_queue(capacity=4, refused={"q0"})
    progress = Progress(num_todo=1)
    _run(_app(handle), _lines(1), 4, tmp_path / "alone.jsonl", progress)
    [record] = _records(tmp_path / "alone.jsonl")
    assert record["response"]["status_code"] == 429 and posts["q0"] == 1  # alone in the app: at once

    num_lines = 60
    handle, posts = _bounded_queue(capacity=4, refused={"q5"})  # refused while other lines are inside
    progress = Progress(num_todo=num_lines)
    _run(_app(handle), _lines(num_lines), 4, tmp_path / "mixed.jsonl", progress)
    by_id = {r["custom_id"]: r["response"]["status_code"] for r in _records(tmp_path / "mixed.jsonl")}
    assert by_id.pop("q5") == 429 and set(by_id.values()) == {200} and len(by_id) == num_lines - 1
    # Beside other lines it waits its turn behind the lines that arrived meanwhile, instead of being sent
    # again after every finished line: it backs off, 1, 2, 4, ... finished lines.
    assert posts["q5"] <= 3 + math.log2(num_lines), posts["q5"]


def test_a_failed_write_stops_the_run_and_leaves_whole_records(tmp_path, monkeypatch):
    """A write that fails mid-record (a full disk) cuts the file back to its last whole record and stops the
    run, so a rerun reads the file as its own and answers every line not in it."""
    output_path = tmp_path / "out.jsonl"
    real_write, num_writes = os.write, Counter()

    def write(fd: int, data) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") != str(output_path):
            return real_write(fd, data)
        num_writes["output"] += 1
        if num_writes["output"] == 4:  # the fourth record: a partial write lands, the rest meets a full disk
            return real_write(fd, bytes(data[:10]))
        if num_writes["output"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    async def answer(prompt: str) -> JSONResponse:
        return JSONResponse({"text": prompt})

    monkeypatch.setattr(os, "write", write)
    progress = Progress(num_todo=20)
    dispatcher = _run(_app(answer), _lines(20), 1, output_path, progress)
    monkeypatch.undo()
    assert dispatcher.is_stopping and dispatcher.write_error.errno == errno.ENOSPC
    assert progress.num_done == 3  # counted: only what was written whole
    assert output_path.read_bytes().endswith(b"\n")
    assert [r["custom_id"] for r in _records(output_path)] == ["q0", "q1", "q2"]
    assert read_finished(output_path).custom_ids == {"q0", "q1", "q2"}  # a rerun resumes from here


def test_every_line_is_answered_whatever_the_interleaving(tmp_path):
    """Seeded random runs (queue sizes, concurrency, oversized lines, answer times): every line gets its
    record, 429 exactly for the oversized ones, and no run hangs (a line waiting for a turn that no line in
    the app is left to hand on would)."""

    async def one(seed: int) -> None:
        rnd = random.Random(seed)
        capacity, concurrency, num_lines = rnd.randint(1, 4), rnd.randint(1, 8), rnd.randint(1, 30)
        oversized = {f"q{i}" for i in range(num_lines) if rnd.random() < 0.15}
        handle, _ = _bounded_queue(capacity, oversized, delay_s=lambda: rnd.random() * 0.003)
        output = OutputFile(tmp_path / f"{seed}.jsonl")
        try:
            run = _run_app(_app(handle), Settings(), _lines(num_lines), concurrency, output, Progress(num_lines))
            await asyncio.wait_for(run, 20)
        finally:
            output.close()
        got = {r["custom_id"]: r["response"]["status_code"] for r in _records(tmp_path / f"{seed}.jsonl")}
        assert got == {f"q{i}": 429 if f"q{i}" in oversized else 200 for i in range(num_lines)}, seed

    for seed in range(100):
        asyncio.run(one(seed))
