"""Collecting results: each engine request's outputs accumulated per sequence, and the outputs of several
engine requests merged into one stream in arrival order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from lmservice.api.errors import ClientDisconnected
from lmservice.engine.outputs import RequestOutput, TokenLogprob
from lmservice.engine.sampling_params import SamplingParams

T = TypeVar("T")


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
    """One engine request: one prompt and its n sequences, as far as its outputs have been applied."""

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
    last_token_time: float | None = None  # kept by the CallRecorder, for inter-token latency

    def apply(self, out: RequestOutput) -> int:
        """Fold one output into the run; returns how many tokens it brought."""
        new_tokens = 0
        for delta in out.outputs:
            seq = self.sequences[delta.index]
            seq.text += delta.text
            seq.token_ids.extend(delta.token_ids)
            new_tokens += len(delta.token_ids)
            if delta.logprobs:
                seq.logprobs.extend(delta.logprobs)
            if delta.finish_reason is not None:
                seq.finish_reason = delta.finish_reason
                seq.stop_reason = delta.stop_reason
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.scores is not None:
            self.scores = out.scores
        if out.embedding is not None:
            self.embedding = out.embedding
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        self.num_generated_tokens = max(self.num_generated_tokens, out.num_generated_tokens)
        self.is_finished = self.is_finished or out.finished
        return new_tokens


OnOutput = Callable[[PromptRun, RequestOutput, int], None]  # (run, the output just applied, its new tokens)


async def run_outputs(run: PromptRun, on_output: OnOutput) -> AsyncIterator[RequestOutput]:
    """The run's outputs, each applied to `run` and handed to `on_output` before it is yielded."""
    async for out in run.stream:
        on_output(run, out, run.apply(out))
        yield out
        if out.finished:
            return


async def merged_outputs(runs: list[PromptRun], on_output: OnOutput) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index in `runs`, output) of all runs, in arrival order."""
    if len(runs) == 1:
        async with contextlib.aclosing(run_outputs(runs[0], on_output)) as events:
            async for out in events:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, run: PromptRun) -> None:
        try:
            async for out in run_outputs(run, on_output):
                await queue.put((i, out, None))
        except Exception as e:  # noqa: BLE001 (surfaced to the consumer below)
            await queue.put((i, None, e))
        await queue.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(runs)]
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
