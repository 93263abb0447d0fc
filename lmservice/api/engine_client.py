"""The API's one door to the engine: every route takes the same path through it.

    sub = Submission.open(request, entry, "cmpl")                 # entry: state.models resolved the model
    call = sub.submit(await sub.tokenize(prompts), params, task)  # checked once, then admitted all or none
    return await call.respond(request, chunks or None, build)     # SSE, or run to the end and answer the model

Three jobs, three modules: submitting (lmservice/api/submission.py), collecting results
(lmservice/api/results.py) and recording latency and usage (lmservice/api/accounting.py). An
`EngineCall` holds the admitted engine requests behind one HTTP request (one per prompt; each may
carry n sequences) and ties the other two together. Invariant: once `close()` has run, none of its
requests is left running in the engine or listed in `in_flight`, and its token counts are in the
metrics; `respond` closes it (the SSE response does, on completion, error or disconnect), so nothing
leaks KV blocks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from lmservice.api.accounting import CallRecorder, usage_of
from lmservice.api.results import PromptRun, merged_outputs, until_disconnect
from lmservice.api.schemas.common import Usage
from lmservice.api.sse import EventStreamResponse
from lmservice.api.state import ServerState
from lmservice.engine.outputs import EngineRequestError, RequestOutput
from lmservice.serving.structured import StructuredSpec, decoding_failure

if TYPE_CHECKING:
    from lmservice.serving.models import ModelEntry


class EngineCall:
    """The admitted engine requests of one HTTP request, on one model (see module docstring)."""

    def __init__(self, state: ServerState, recorder: CallRecorder, entry: ModelEntry, call_id: str,
                 runs: list[PromptRun], spec: StructuredSpec | None = None) -> None:
        self.state, self.recorder, self.entry = state, recorder, entry
        self.spec = spec
        self.id = call_id
        self.runs = runs
        self.created = int(time.time())
        self._closed = False
        state.in_flight.update(run.request_id for run in runs)

    async def merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) of all runs in arrival order, each already applied to its run and recorded.
        A run whose grammar failed while decoding raises the spec's 400 (RequestRejectedError)."""
        async with contextlib.aclosing(merged_outputs(self.runs, self._on_output)) as events:
            try:
                async for item in events:
                    yield item
            except EngineRequestError as e:
                rejected = decoding_failure(self.spec, str(e)) if self.spec is not None else None
                if rejected is None:
                    raise
                raise rejected from e

    def _on_output(self, run: PromptRun, out: RequestOutput, new_tokens: int) -> None:
        self.recorder.observe(run, out, new_tokens)
        if out.finished:
            self.state.in_flight.discard(run.request_id)

    async def respond(self, request: Request, chunks: AsyncIterator[dict[str, Any]] | None,
                      build: Callable[[], BaseModel]) -> Response | BaseModel:
        """With `chunks`: the SSE stream of them (closed on completion, error or disconnect). Without:
        every request run to its end (aborted if the client leaves), then build()'s response model."""
        if chunks is not None:
            return EventStreamResponse(chunks, on_close=self.close)
        try:
            await until_disconnect(request, self._run_to_end())
        finally:
            self.close()
        return build()

    async def _run_to_end(self) -> None:
        async with contextlib.aclosing(self.merged()) as events:
            async for _ in events:
                pass

    def usage(self) -> Usage:
        return usage_of(self.runs)

    def log_output(self, output: Any) -> None:
        self.recorder.log_output(output)

    def close(self) -> None:
        """Abort what is still running, count tokens (finished or not). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for run in self.runs:
            if not run.is_finished and self.state.engine is not None:
                self.state.engine.abort(run.request_id)
            self.state.in_flight.discard(run.request_id)
        self.recorder.count(self.runs)
