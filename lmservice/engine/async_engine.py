"""The engine as the event loop sees it: `Engine` stepping in one worker thread, an async stream per request.

The asyncio event loop never waits on model compute: `add_requests` and `abort`
only check and enqueue a command; the worker thread takes the commands between
steps, runs `Engine.step()`, and hands each step's outputs back with one
`call_soon_threadsafe`. What crosses the thread is typed: requests already
validated (`EngineRequest`) and three small commands.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from lmservice.engine.engine import Engine, EngineStats
from lmservice.engine.engine_request import EngineRequest, RequestValidator
from lmservice.engine.outputs import EngineRequestError, RequestOutput, RequestRejectedError

log = logging.getLogger("lmservice.engine")

T = TypeVar("T")


@dataclass(frozen=True)
class AddRequests:
    """Requests admitted together (the prompts of one HTTP request): added in one go between steps."""

    requests: tuple[EngineRequest, ...]

    @property
    def num_seqs(self) -> int:
        return sum(r.num_seqs for r in self.requests)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(r.num_prompt_tokens for r in self.requests)


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class CallOnEngine:
    """Run `fn(engine)` on the engine thread, between steps (adapters are changed this way)."""

    fn: Callable[[Engine], Any]
    future: Future


class RequestStream:
    """Async iterator over one request's RequestOutput events; ends after the finished one."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def put(self, out: RequestOutput) -> None:
        self._queue.put_nowait(out)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            out = await self._queue.get()
            if out.finished:
                self.finished = True
            if out.error is not None:
                raise EngineRequestError(out.error)
            yield out


class AsyncEngine:
    """Owns the engine thread. Invariant: every request in `_streams` is queued in an AddRequests
    command or held by the engine, and its stream gets exactly one finished output."""

    def __init__(self, engine: Engine, handoff_timeout_s: float | None = None) -> None:
        self.engine = engine
        # NOTE: on a CPU the model's OpenMP threads take every core, and a parallel region stalls whenever the
        # event loop (HTTP, SSE) holds one of them. With a hand-off the engine thread waits after each step
        # until the loop has handed that step's outputs to the streams' consumers (at most this long), so the
        # two take turns instead of colliding (int8 at 32 streams on 2 cores: 1.4x in one A/B; fp32 runs too
        # noisy to show an effect, docs/benchmarks.md).
        # None: no waiting (a GPU step leaves the cores free).
        self._handoff_timeout_s = handoff_timeout_s
        self._streams: dict[str, RequestStream] = {}
        self._commands: queue.SimpleQueue[AddRequests | Abort | CallOnEngine] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: BaseException | None = None
        # Admitted adds not yet taken by the engine thread: the queue bounds count them too.
        self._pending_lock = threading.Lock()
        self._pending_seqs = 0
        self._pending_tokens = 0

    # --- what callers read (immutable, or plain reads) ---
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def validator(self) -> RequestValidator:
        """What requests are checked against, before `add_requests` (immutable: safe on any thread)."""
        return self.engine.validator

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def eos_token_id(self) -> int | None:
        return self.engine.eos_token_id

    @property
    def kernels(self) -> dict[str, str]:
        """The kernels in use, chosen once at start-up: `ops` the op set (torch, native, triton), `cpu` the
        build of the C kernels this CPU runs (x86-64-v4-vnni, ...) or torch where none runs."""
        return {"ops": self.engine.ops.name, "cpu": str(self.engine.cpu_kernels.describe()["variant"])}

    @property
    def kv_cache(self) -> dict[str, str | int]:
        """The KV cache, allocated once at start-up: its storage dtype, blocks, block size and bytes."""
        return self.engine.runner.kv_cache.describe()

    def stats(self) -> EngineStats:
        """Counters now (plain reads of ints under the GIL; never waits for a step, changes nothing)."""
        return self.engine.stats()

    def step_samples_since(self, num_seen: int) -> tuple[list[tuple[int, int]], int]:
        return self.engine.step_samples_since(num_seen)

    # --- lifecycle ---
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lmservice-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._failed is None

    # --- requests ---
    def add_requests(self, requests: list[EngineRequest]) -> list[RequestStream]:
        """Admit validated requests all or none, and enqueue them; never waits for the engine thread.
        The queue bounds are checked once for their sum, so requests are refused whole (QueueFullError)
        and never take room from other clients meanwhile; requests larger than the bounds on their own are
        refused for good (RequestRejectedError)."""
        self._check_alive()
        ids = [r.request_id for r in requests]
        for request_id in ids:
            if request_id in self._streams or ids.count(request_id) > 1:
                raise RequestRejectedError(f"request id {request_id!r} is already in use", "request_id")
        command = AddRequests(tuple(requests))
        self.engine.check_fits(command.num_seqs, command.num_prompt_tokens)  # 400: no wait would admit it
        with self._pending_lock:
            self.engine.check_admission(command.num_seqs + self._pending_seqs,
                                        command.num_prompt_tokens + self._pending_tokens)
            self._pending_seqs += command.num_seqs
            self._pending_tokens += command.num_prompt_tokens
        streams = [RequestStream(request_id) for request_id in ids]
        for stream in streams:
            self._streams[stream.request_id] = stream
        self._send(command)
        return streams

    def abort(self, request_id: str) -> None:
        self._send(Abort(request_id))

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """`fn(engine)` on the engine thread, between steps; its result or its exception."""
        self._check_alive()
        future: Future = Future()
        self._send(CallOnEngine(fn, future))
        return await asyncio.wrap_future(future)

    def call_now(self, fn: Callable[[Engine], T]) -> T:
        """`fn(engine)` on this thread; only before `start()` (at start-up, when no thread owns the engine)."""
        if self._thread is not None:
            raise RuntimeError("the engine thread is running: use `await call(fn)`")
        return fn(self.engine)

    def _send(self, command: AddRequests | Abort | CallOnEngine) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise EngineRequestError(f"the engine loop died: {self._failed}")

    # --- the worker thread ---
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
                    self._dispatch(outputs, handoff=self._handoff_timeout_s is not None)
                    if not outputs and not self.engine.has_running():
                        self._wakeup.wait(0.01)  # nothing could be scheduled: don't spin
                        self._wakeup.clear()
                else:
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
        except BaseException as e:  # noqa: BLE001 (reported through is_alive and the streams)
            log.exception("engine loop died")
            self._failed = e
            self._fail_all(f"engine loop died: {e}")

    def _drain_commands(self) -> None:
        outputs = []
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, AddRequests):
                for request in command.requests:
                    try:
                        self.engine.add_request(request)
                    except Exception as e:  # noqa: BLE001 (e.g. an adapter removed meanwhile: fails alone)
                        message = f"model {e} is no longer served" if isinstance(e, KeyError) else str(e)
                        outputs.append(RequestOutput(request_id=request.request_id, outputs=[], finished=True,
                                                     error=message))
                with self._pending_lock:  # after the adds: the bound never undercounts
                    self._pending_seqs -= command.num_seqs
                    self._pending_tokens -= command.num_prompt_tokens
            elif isinstance(command, Abort):
                out = self.engine.abort(command.request_id)
                if out is not None:
                    outputs.append(out)
            else:
                try:
                    command.future.set_result(command.fn(self.engine))
                except Exception as e:  # noqa: BLE001 (handed to the awaiting caller)
                    command.future.set_exception(e)
        if outputs:
            self._dispatch(outputs)

    def _dispatch(self, outputs: list[RequestOutput], handoff: bool = False) -> None:
        if not outputs or self._loop is None:
            return
        delivered = threading.Event() if handoff else None
        self._loop.call_soon_threadsafe(self._deliver, outputs, delivered)
        if delivered is not None:
            delivered.wait(self._handoff_timeout_s)

    def _deliver(self, outputs: list[RequestOutput], delivered: threading.Event | None = None) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)
        if delivered is not None:
            # The puts woke the consumers: they run in the loop's next pass, this event's setter in the one after.
            self._loop.call_soon(self._loop.call_soon, delivered.set)

    def _fail_all(self, message: str) -> None:
        failed = [RequestOutput(request_id=rid, outputs=[], finished=True, error=message) for rid in list(self._streams)]
        self._dispatch(failed)
