"""Submitting: one HTTP request's prompts tokenized, its grammar compiled, every engine request checked
once and then admitted all or none. What comes out is an `EngineCall` whose requests are in the engine."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import Request

from lmservice.api.accounting import CallRecorder
from lmservice.api.engine_client import EngineCall
from lmservice.api.errors import APIError
from lmservice.api.middleware import record_of
from lmservice.api.results import PromptRun, SequenceResult
from lmservice.api.state import ServerState
from lmservice.engine.engine_request import EngineTask
from lmservice.engine.sampling_params import SamplingParams
from lmservice.serving.structured import StructuredSpec, structured_spec

if TYPE_CHECKING:
    from lmservice.serving.models import ModelEntry


class Submission:
    """What a route builds before anything reaches the engine (see module docstring)."""

    def __init__(self, state: ServerState, recorder: CallRecorder, entry: ModelEntry, prefix: str) -> None:
        self.state, self.recorder, self.entry = state, recorder, entry
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.spec: StructuredSpec | None = None  # structured output: what the output must match
        self.grammar = None  # and its compiled template, which every prompt's sequences copy

    @classmethod
    def open(cls, request: Request, entry: ModelEntry, prefix: str) -> Submission:
        state: ServerState = request.app.state.server
        settings = state.settings
        recorder = CallRecorder(state.metrics, record_of(request.scope), entry.name,
                                settings.log_prompts or settings.otlp_trace_prompts, adapter=entry.adapter)
        return cls(state, recorder, entry, prefix)

    async def tokenize(self, prompts: list[str | list[int]], param: str = "prompt") -> list[list[int]]:
        """Token ids of each prompt (text, or ids given directly), after the cap on prompts per request;
        texts are length-checked and tokenized off the event loop (lmservice/api/tokenizing.py); the
        prompts are logged when settings.log_prompts. 400 naming `param` for an empty prompt, a text too
        long for the context, or a token id outside the vocabulary."""
        limit = self.state.settings.max_prompts_per_request
        if len(prompts) > limit:
            raise APIError(400, f"{param}: at most {limit} prompts in one request (--max-prompts-per-request), "
                                f"got {len(prompts)}", param=param)
        self.recorder.log_prompt(prompts[0] if len(prompts) == 1 else repr(prompts))
        engine, _ = self.state.started()
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await self.state.tokenizing.encode(texts, param) if texts else [])
        ids = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
        if any(not i for i in ids):
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        vocab = engine.validator.vocab_size
        # The engine's validator checks ids too, but names its own field (`prompt`): the client's is `param`.
        bad = next((t for p in prompts if not isinstance(p, str) for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab})", param=param)
        return ids

    async def constrain(self, fields: dict[str, Any]) -> None:
        """Compile the request's response_format / structured_outputs, if any (400 when invalid), in a
        worker thread: compiling never blocks the event loop. The template is cached per spec."""
        self.spec = structured_spec(fields)
        if self.spec is not None:
            self.grammar = await asyncio.to_thread(self.state.grammars.compile, self.spec)

    def submit(self, prompts: list[list[int]], params: SamplingParams, task: EngineTask = "generate") -> EngineCall:
        """Check every prompt against the engine, then admit them all or none (one admission for the
        whole HTTP request). Raises (rendered by the error handlers) 400 for a rejected request,
        429 when the queue is full, 503 when not ready or draining; nothing is left in the engine."""
        engine, _ = self.state.started()
        if not self.state.is_ready():
            raise APIError(503, "server is draining" if self.state.is_draining else "server is not ready")
        requests = [engine.validator.check(f"{self.id}-{i}", ids, params, task=task, adapter=self.entry.adapter,
                                           grammar=self.grammar) for i, ids in enumerate(prompts)]
        streams = engine.add_requests(requests)
        runs = [PromptRun(request.request_id, list(request.prompt_token_ids), params, stream,
                          [SequenceResult() for _ in range(params.n)])
                for request, stream in zip(requests, streams, strict=True)]
        # A prefill-only task's params are defaults, not the client's: the trace names none.
        self.recorder.admitted(self.id, params if task == "generate" else None, len(runs))
        return EngineCall(self.state, self.recorder, self.entry, self.id, runs, spec=self.spec)
