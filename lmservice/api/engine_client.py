"""The API's one door to the engine: every route takes the same path through it.

    call = EngineCall.open(request, entry, "cmpl")     # entry: state.models resolved the request's model
    call.submit(call.tokenize(prompts), params, task)  # each prompt checked once, then admitted all or none
    return await call.respond(request, chunks or None, build)   # SSE, or run to the end and answer JSON

An `EngineCall` holds every engine request behind one HTTP request (one per
prompt; each may carry n sequences). Invariant: once `close()` has run, none
of its requests is left running in the engine or listed in `in_flight`, and
its token counts are in the metrics; `respond` closes it (the SSE response
does, on completion, error or disconnect), so nothing leaks KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from lmservice.api.errors import APIError, ClientDisconnected
from lmservice.api.middleware import RequestRecord, record_of
from lmservice.api.sse import EventStreamResponse
from lmservice.api.state import ServerState
from lmservice.engine.engine_request import EngineTask
from lmservice.engine.outputs import RequestOutput, TokenLogprob
from lmservice.engine.sampling_params import SamplingParams
from lmservice.serving.structured import structured_spec

if TYPE_CHECKING:
    from lmservice.serving.models import ModelEntry

T = TypeVar("T")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class SequenceResult:
    """One of a prompt's n sequences, accumulated from its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class PromptRun:
    """One engine request: one prompt and its n sequences."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: Any  # the engine's RequestStream
    sequences: list[SequenceResult]
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    scores: list[float] | None = None
    embedding: list[float] | None = None
    is_finished: bool = False
    last_token_time: float | None = None


class EngineCall:
    """All engine requests of one HTTP request, on one model (see module docstring)."""

    def __init__(self, state: ServerState, record: RequestRecord, entry: ModelEntry, prefix: str) -> None:
        self.state = state
        self.record = record
        self.entry = entry
        self.id = new_request_id(prefix)
        self.runs: list[PromptRun] = []
        self.created = int(time.time())
        self._arrival = time.monotonic()
        self._closed = False
        self.grammar = None  # structured output: the compiled template every prompt's sequences copy
        record.model = entry.name

    @classmethod
    def open(cls, request: Request, entry: ModelEntry, prefix: str) -> EngineCall:
        return cls(request.app.state.server, record_of(request.scope), entry, prefix)

    # ---- submission -------------------------------------------------------------------------------

    def tokenize(self, prompts: list[str | list[int]], param: str = "prompt") -> list[list[int]]:
        """Token ids of each prompt (text, or ids given directly), after the cap on prompts per request;
        the prompts are logged when settings.log_prompts. 400 naming `param` for an empty prompt."""
        limit = self.state.settings.max_prompts_per_request
        if len(prompts) > limit:
            raise APIError(400, f"{param}: at most {limit} prompts in one request (--max-prompts-per-request), "
                                f"got {len(prompts)}", param=param)
        self.log_prompt(prompts[0] if len(prompts) == 1 else repr(prompts))
        tokenizer = self.state.started()[0].tokenizer
        ids = [tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p) for p in prompts]
        if any(not i for i in ids):
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        return ids

    async def constrain(self, fields: dict[str, Any]) -> None:
        """Compile the request's response_format / structured_outputs, if any (400 when invalid), in a
        worker thread: compiling never blocks the event loop. The template is cached per spec."""
        spec = structured_spec(fields)
        if spec is not None:
            self.grammar = await asyncio.to_thread(self.state.grammars.compile, spec)

    def submit(self, prompts: list[list[int]], params: SamplingParams, task: EngineTask = "generate") -> None:
        """Check every prompt against the engine, then admit them all or none (one admission for the
        whole HTTP request). Raises (rendered by the error handlers) 400 for a rejected request,
        429 when the queue is full, 503 when not ready or draining; nothing is left in the engine."""
        engine, _ = self.state.started()
        if not self.state.is_ready():
            raise APIError(503, "server is draining" if self.state.is_draining else "server is not ready")
        requests = [engine.validator.check(f"{self.id}-{i}", ids, params, task=task, adapter=self.entry.adapter,
                                           grammar=self.grammar) for i, ids in enumerate(prompts)]
        streams = engine.add_requests(requests)
        for request, stream in zip(requests, streams, strict=True):
            self.runs.append(PromptRun(request.request_id, list(request.prompt_token_ids), params, stream,
                                       [SequenceResult() for _ in range(params.n)]))
            self.state.in_flight.add(request.request_id)
            self.record.num_engine_requests += 1

    def log_prompt(self, prompt: Any) -> None:
        if self.state.settings.log_prompts:
            self.record.prompt = prompt if isinstance(prompt, str) else repr(prompt)

    def log_output(self, output: Any) -> None:
        if self.state.settings.log_prompts:
            self.record.output = output if isinstance(output, str) else repr(output)

    # ---- answering --------------------------------------------------------------------------------

    async def respond(self, request: Request, chunks: AsyncIterator[dict[str, Any]] | None,
                      build: Callable[[], dict[str, Any]]) -> Response:
        """With `chunks`: the SSE stream of them (closed on completion, error or disconnect). Without:
        every request run to its end (aborted if the client leaves), then build()'s JSON."""
        if chunks is not None:
            return EventStreamResponse(chunks, on_close=self.close)
        await self.finish(request)
        return JSONResponse(build())

    # ---- following outputs --------------------------------------------------------------------------

    async def events(self, run: PromptRun) -> AsyncIterator[RequestOutput]:
        """The run's outputs, each already applied to `run` (text, tokens, logprobs, counts)."""
        async for out in run.stream:
            self._apply(run, out)
            yield out
            if out.finished:
                return

    async def merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) of all runs, in arrival order."""
        if len(self.runs) == 1:
            async with contextlib.aclosing(self.events(self.runs[0])) as events:
                async for out in events:
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, run: PromptRun) -> None:
            try:
                async for out in self.events(run):
                    await queue.put((i, out, None))
            except Exception as e:  # noqa: BLE001 (surfaced to the consumer below)
                await queue.put((i, None, e))
            await queue.put((i, None, None))

        tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(self.runs)]
        try:
            remaining = len(tasks)
            while remaining:
                i, out, err = await queue.get()
                if err is not None:
                    raise err
                if out is None:
                    remaining -= 1
                else:
                    yield i, out
        finally:
            for task in tasks:
                task.cancel()

    async def run_to_end(self) -> list[PromptRun]:
        async with contextlib.aclosing(self.merged()) as events:
            async for _ in events:
                pass
        return self.runs

    async def finish(self, request: Request) -> list[PromptRun]:
        """Non-streaming: run every request to its end (aborted if the client leaves), then close."""
        try:
            return await until_disconnect(request, self.run_to_end())
        finally:
            self.close()

    def _apply(self, run: PromptRun, out: RequestOutput) -> None:
        now = time.monotonic()
        new_tokens = 0
        for delta in out.outputs:
            seq = run.sequences[delta.index]
            seq.text += delta.text
            seq.token_ids.extend(delta.token_ids)
            new_tokens += len(delta.token_ids)
            if delta.logprobs:
                seq.logprobs.extend(delta.logprobs)
            if delta.finish_reason is not None:
                seq.finish_reason = delta.finish_reason
                seq.stop_reason = delta.stop_reason
        if out.prompt_logprobs is not None:
            run.prompt_logprobs = out.prompt_logprobs
        if out.scores is not None:
            run.scores = out.scores
        if out.embedding is not None:
            run.embedding = out.embedding
        run.num_prompt_tokens = out.num_prompt_tokens or run.num_prompt_tokens
        run.num_generated_tokens = max(run.num_generated_tokens, out.num_generated_tokens)
        self._observe_latency(run, out, now, new_tokens)
        if out.finished:
            run.is_finished = True
            self.state.in_flight.discard(run.request_id)
            self.record.finish_reasons.extend(s.finish_reason or "" for s in run.sequences)
            arrival = out.arrival_time or self._arrival
            self.state.metrics.e2e_request_latency.labels(self.entry.name).observe(max(0.0, now - arrival))

    def _observe_latency(self, run: PromptRun, out: RequestOutput, now: float, new_tokens: int) -> None:
        m, model = self.state.metrics, self.entry.name
        if new_tokens == 0:
            return
        if run.last_token_time is None:
            arrival = out.arrival_time or self._arrival
            first_token = out.first_token_time or now
            ttft = max(0.0, first_token - arrival)
            m.time_to_first_token.labels(model).observe(ttft)
            if out.first_scheduled_time is not None:
                queue_s = max(0.0, out.first_scheduled_time - arrival)
                m.request_queue_time.labels(model).observe(queue_s)
                self.record.queue_ms = self.record.queue_ms or round(queue_s * 1000, 2)
            self.record.ttft_ms = self.record.ttft_ms or round(ttft * 1000, 2)
        else:
            # Tokens that arrive together (the event loop lagged a step) share the gap evenly.
            gap = (now - run.last_token_time) / new_tokens
            for _ in range(new_tokens):
                m.inter_token_latency.labels(model).observe(gap)
        run.last_token_time = now

    # ---- the end --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Abort what is still running, count tokens (finished or not). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for run in self.runs:
            if not run.is_finished and self.state.engine is not None:
                self.state.engine.abort(run.request_id)
            self.state.in_flight.discard(run.request_id)
            num_prompt = run.num_prompt_tokens or (len(run.prompt_token_ids) if run.is_finished else 0)
            self.state.metrics.prompt_tokens.labels(self.entry.name).inc(num_prompt)
            self.state.metrics.generation_tokens.labels(self.entry.name).inc(run.num_generated_tokens)
            self.record.prompt_tokens += num_prompt
            self.record.completion_tokens += run.num_generated_tokens

    def usage(self) -> dict[str, int]:
        prompt = sum(r.num_prompt_tokens for r in self.runs)
        completion = sum(r.num_generated_tokens for r in self.runs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client goes away first: then cancel it and raise ClientDisconnected.
    (A non-streaming request is otherwise invisible to a disconnect until its answer is written.)"""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected()
    finally:
        for t in (task, watcher):
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
