"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

Choice indices follow OpenAI: with several prompts and n sequences each,
choice `i * n + j` is sequence j of prompt i.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request

from lmservice.api.auth import require_api_key, server_state
from lmservice.api.chat import render_chat_prompt
from lmservice.api.engine_client import EngineCall
from lmservice.api.errors import APIError, model_not_found
from lmservice.api.logprobs import TokenText, chat_logprobs, completion_logprobs
from lmservice.api.results import PromptRun
from lmservice.api.schemas.common import ERROR_RESPONSES
from lmservice.api.schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelInfo,
    ModelList,
)
from lmservice.api.submission import Submission
from lmservice.engine.outputs import CompletionDelta, TokenLogprob
from lmservice.engine.sampling_params import MAX_LOGPROBS
from lmservice.serving.sampling import beam_width, sampling_params

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])

_STREAM_DOC = {"text/event-stream": {"example": 'data: {"id": "cmpl-3f2a", "choices": [...]}\n\ndata: [DONE]\n\n'}}


_RESPONSES = {200: {"content": _STREAM_DOC}, **ERROR_RESPONSES}


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    return list(prompt)  # type: ignore[arg-type]


async def _deltas(call: EngineCall) -> AsyncIterator[tuple[int, int, CompletionDelta]]:
    """(choice index, prompt index, delta) of every sequence, as they come."""
    async for i, out in call.merged():
        n = call.runs[i].params.n
        for delta in out.outputs:
            yield i * n + delta.index, i, delta


def _chunk_head(call: EngineCall, obj: str) -> dict[str, Any]:
    """The fields every chunk of a stream starts with (a final answer has them too, from its model)."""
    return {"id": call.id, "object": obj, "created": call.created, "model": call.entry.name}


# ---------------------------------------------------------------- completions


def _echoed(run: PromptRun, ids: list[int], lps: list[TokenLogprob]) -> tuple[list[int], list]:
    """echo with logprobs: the prompt's ids and logprobs (None for the first token) lead the output's."""
    prompt_lps = run.prompt_logprobs or [None] * len(run.prompt_token_ids)
    return run.prompt_token_ids + ids, list(prompt_lps) + lps


@router.post("/v1/completions", response_model=CompletionResponse, responses=_RESPONSES)
async def completions(body: CompletionRequest, request: Request):
    engine, models = server_state(request).started()
    sub = Submission.open(request, models.resolve(body.model, "generate"), "cmpl")
    prompts = await sub.tokenize(_prompt_list(body.prompt))
    echo_logprobs = body.echo and body.logprobs is not None
    await sub.constrain(dict(body))
    call = sub.submit(prompts, sampling_params(dict(body), default_max_tokens=16, n=body.n, logprobs=body.logprobs,
                                               prompt_logprobs=body.logprobs if echo_logprobs else None,
                                               num_beams=beam_width(body.use_beam_search, body.best_of, body.n)))
    prompt_texts = [engine.tokenizer.decode(ids) for ids in prompts] if body.echo else None
    token_text = TokenText(engine.tokenizer)

    def build() -> CompletionResponse:
        choices = []
        for i, run in enumerate(call.runs):
            for j, seq in enumerate(run.sequences):
                prefix = prompt_texts[i] if prompt_texts else ""
                logprobs = None
                if body.logprobs is not None:
                    ids, lps = list(seq.token_ids), list(seq.logprobs)
                    if echo_logprobs:
                        ids, lps = _echoed(run, ids, lps)
                    logprobs = completion_logprobs(token_text, ids, lps)
                choices.append(CompletionChoice(index=i * run.params.n + j, text=prefix + seq.text, logprobs=logprobs,
                                                finish_reason=seq.finish_reason))
        call.log_output([c.text for c in choices])
        return CompletionResponse(id=call.id, created=call.created, model=call.entry.name, choices=choices,
                                  usage=call.usage())

    chunks = None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _completion_chunks(call, body, prompt_texts, token_text, include_usage)
    return await call.respond(request, chunks, build)


async def _completion_chunks(call: EngineCall, body: CompletionRequest, prompt_texts: list[str] | None,
                             token_text: TokenText, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    head = _chunk_head(call, "text_completion")
    offsets: dict[int, int] = {}  # choice index -> length of the text sent so far (for text_offset)
    async for index, i, delta in _deltas(call):
        run = call.runs[i]
        text, ids, lps = delta.text, list(delta.token_ids), list(delta.logprobs or [])
        if index not in offsets and prompt_texts is not None:  # echo: the prompt leads the first chunk
            text = prompt_texts[i] + text
            if body.logprobs is not None:
                ids, lps = _echoed(run, ids, lps)
        if not text and not ids and delta.finish_reason is None:
            continue
        offset = offsets.get(index, 0)
        offsets[index] = offset + len(text)
        logprobs = completion_logprobs(token_text, ids, lps, offset) if body.logprobs is not None else None
        yield {**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                    "finish_reason": delta.finish_reason}], "usage": None}
    if include_usage:
        yield {**head, "choices": [], "usage": call.usage().model_dump()}


# ---------------------------------------------------------------- chat


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_RESPONSES)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    engine, models = server_state(request).started()
    sub = Submission.open(request, models.resolve(body.model, "generate"), "chatcmpl")
    prompt = await server_state(request).tokenizing.run(render_chat_prompt, engine.tokenizer, body.messages)
    prompts = await sub.tokenize([prompt], param="messages")
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs: must be between 0 and {MAX_LOGPROBS}, got {top_logprobs}",
                       param="top_logprobs")
    await sub.constrain(dict(body))
    call = sub.submit(prompts, sampling_params(dict(body), default_max_tokens=None, n=body.n, logprobs=top_logprobs,
                                               num_beams=beam_width(body.use_beam_search, None, body.n)))
    token_text = TokenText(engine.tokenizer)

    def build() -> ChatCompletionResponse:
        choices = [ChatChoice(index=j, message=AssistantMessage(content=seq.text),
                              logprobs=chat_logprobs(token_text, seq.logprobs) if body.logprobs else None,
                              finish_reason=seq.finish_reason) for j, seq in enumerate(call.runs[0].sequences)]
        call.log_output([c.message.content for c in choices])
        return ChatCompletionResponse(id=call.id, created=call.created, model=call.entry.name, choices=choices,
                                      usage=call.usage())

    chunks = None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chat_chunks(call, body, token_text, include_usage)
    return await call.respond(request, chunks, build)


async def _chat_chunks(call: EngineCall, body: ChatCompletionRequest, token_text: TokenText,
                       include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    head = _chunk_head(call, "chat.completion.chunk")
    for j in range(body.n):  # OpenAI opens every choice with the role
        yield {**head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}
    async for index, _, delta in _deltas(call):
        if not delta.text and not delta.token_ids and delta.finish_reason is None:
            continue
        logprobs = chat_logprobs(token_text, delta.logprobs or []) if body.logprobs else None
        yield {**head, "choices": [{"index": index, "delta": {"content": delta.text} if delta.text else {},
                                    "logprobs": logprobs, "finish_reason": delta.finish_reason}]}
    if include_usage:
        yield {**head, "choices": [], "usage": call.usage().model_dump()}


# ---------------------------------------------------------------- models


def _model_info(request: Request) -> list[ModelInfo]:
    state = server_state(request)
    engine, models = state.started()
    return [ModelInfo(id=e.name, created=int(state.started_at), parent=e.parent, root=e.parent or e.name,
                      tasks=list(e.tasks), max_model_len=engine.max_model_len) for e in models.models()]


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_model_info(request))


@router.get("/v1/models/{model:path}", response_model=ModelInfo, responses=ERROR_RESPONSES)
async def get_model(model: str, request: Request) -> ModelInfo:
    for info in _model_info(request):
        if info.id == model:
            return info
    raise model_not_found(model)
