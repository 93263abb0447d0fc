"""Native endpoints: /v1/generate, /v1/classify, /v1/translate.

Each takes "model" to pick the base model or an adapter; without it the first
model able to do the task answers (for translate: the first whose languages match).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from service.api.auth import require_api_key, server_state
from service.api.engine_client import EngineCall, resolve_model
from service.api.errors import APIError
from service.api.logprobs import TokenText, native_logprobs
from service.api.middleware import record_of
from service.api.params import check_num_prompts, prompt_token_ids, sampling_params
from service.api.schemas.common import ERROR_RESPONSES, SamplingFields
from service.api.schemas.native import (
    ClassifyRequest,
    ClassifyResponse,
    GenerateRequest,
    GenerateResponse,
    TranslateRequest,
    TranslateResponse,
)
from service.api.sse import EventStreamResponse
from service.api.state import ServerState
from service.engine.sampling_params import SamplingParams

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["native"])


def _responses(model: type, stream_example: str | None = None) -> dict:
    ok: dict[str, Any] = {"model": model}
    if stream_example:
        ok["content"] = {"text/event-stream": {"example": stream_example}}
    return {200: ok, **ERROR_RESPONSES}


def _texts(state: ServerState, text: str | list[str]) -> list[str]:
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise APIError(400, "text: must not be an empty list", param="text")
    check_num_prompts(len(texts), state.settings.max_prompts_per_request, "text")
    return texts


async def _text_chunks(call: EngineCall, with_logprobs: bool, token_text: TokenText,
                       indexed: bool) -> AsyncIterator[dict[str, Any]]:
    """Native stream: {"text": delta, ...} per event; the last of each prompt has finish_reason (+ usage at the end)."""
    held: dict[int, list] = {}  # prompt index -> logprobs of tokens whose text has not shown yet
    async for i, out in call.merged():
        for delta in out.outputs:
            logprobs = held.pop(i, []) + list(delta.logprobs or [])
            if not delta.text and delta.finish_reason is None:
                held[i] = logprobs  # a token ending inside a multi-byte character shows up with the next one
                continue
            chunk: dict[str, Any] = {"id": call.id, "model": call.entry.name, "text": delta.text,
                                     "finish_reason": delta.finish_reason}
            if indexed:
                chunk["index"] = i
            if with_logprobs:
                chunk["logprobs"] = native_logprobs(token_text, logprobs)
            yield chunk
    yield {"id": call.id, "model": call.entry.name, "text": "", "finish_reason": None, "usage": call.usage()}


# ---------------------------------------------------------------- generate


@router.post("/v1/generate", responses=_responses(
    GenerateResponse, 'data: {"id": "gen-1a2b", "text": " there", "finish_reason": null}\n\n'
    'data: {"id": "gen-1a2b", "text": "", "finish_reason": null, "usage": {...}}\n\ndata: [DONE]\n\n'))
async def generate(body: GenerateRequest, request: Request):
    state = server_state(request)
    entry = resolve_model(state, body.model, "generate")
    tokenizer = state.engine.tokenizer
    ids = prompt_token_ids(tokenizer, body.prompt)
    params = sampling_params(body, default_max_tokens=64, logprobs=body.logprobs)
    call = EngineCall(state, record_of(request.scope), entry, "gen")
    if state.settings.log_prompts:
        call.record.prompt = body.prompt
    call.submit_all([ids], params)
    token_text = TokenText(tokenizer)
    if body.stream:
        return EventStreamResponse(_text_chunks(call, body.logprobs is not None, token_text, indexed=False),
                                   on_close=call.close)
    await call.finish(request)
    seq = call.runs[0].sequences[0]
    if state.settings.log_prompts:
        call.record.output = seq.text
    return JSONResponse({
        "id": call.id, "model": entry.name, "text": seq.text, "finish_reason": seq.finish_reason,
        "usage": call.usage(),
        "logprobs": native_logprobs(token_text, seq.logprobs) if body.logprobs is not None else None})


# ---------------------------------------------------------------- classify


@router.post("/v1/classify", responses=_responses(ClassifyResponse))
async def classify(body: ClassifyRequest, request: Request):
    state = server_state(request)
    entry = resolve_model(state, body.model, "classify")
    labels = list(entry.card.labels or [])
    texts = _texts(state, body.text)
    prompts = [prompt_token_ids(state.engine.tokenizer, t, param="text") for t in texts]
    call = EngineCall(state, record_of(request.scope), entry, "cls")
    if state.settings.log_prompts:
        call.record.prompt = repr(texts)
    # Classification is one prefill: nothing is sampled, so the params only carry the defaults.
    call.submit_all(prompts, SamplingParams(max_tokens=0, temperature=0.0), task="classify")
    await call.finish(request)
    results = []
    for run in call.runs:
        scores = run.scores or []
        if len(scores) != len(labels) or not scores:
            raise APIError(500, f"model {entry.name!r} returned {len(scores)} scores for {len(labels)} labels")
        best = max(range(len(scores)), key=scores.__getitem__)
        results.append({"label": labels[best], "score": scores[best],
                        "scores": dict(zip(labels, scores, strict=True))})
    if state.settings.log_prompts:
        call.record.output = repr([r["label"] for r in results])
    return JSONResponse({"id": call.id, "model": entry.name, "results": results, "usage": call.usage()})


# ---------------------------------------------------------------- translate


def _pair(body: TranslateRequest) -> str:
    return f"{body.source or '*'} -> {body.target or '*'}"


def _translation_model(state: ServerState, body: TranslateRequest):
    """The model named in the request, or the first translate model whose languages match."""
    def matches(entry) -> bool:
        langs = entry.card.languages
        return langs is not None and body.source in (None, langs.source) and body.target in (None, langs.target)

    if body.model is not None:
        entry = resolve_model(state, body.model, "translate")
        if not matches(entry):
            langs = entry.card.languages
            have = f"{langs.source} -> {langs.target}" if langs else "unknown languages"
            param = "source" if langs is not None and body.source not in (None, langs.source) else "target"
            raise APIError(400, f"model {entry.name!r} translates {have}, not {_pair(body)}",
                           param=param)
        return entry
    candidates = [e for e in state.engine.models() if "translate" in e.tasks]
    for entry in candidates:
        if matches(entry):
            return resolve_model(state, entry.name, "translate")
    if not candidates:
        return resolve_model(state, None, "translate")  # raises the engine's own "no model can" error
    have = ", ".join(f"{e.name} ({e.card.languages.source} -> {e.card.languages.target})" for e in candidates
                     if e.card.languages)
    raise APIError(400, f"no model translates {_pair(body)}; available: {have}",
                   param="source")


@router.post("/v1/translate", responses=_responses(
    TranslateResponse, 'data: {"id": "tr-5c3d", "index": 0, "text": " Ein", "finish_reason": null}\n\n'
    'data: [DONE]\n\n'))
async def translate(body: TranslateRequest, request: Request):
    state = server_state(request)
    entry = _translation_model(state, body)
    langs = entry.card.languages
    texts = _texts(state, body.text)
    tokenizer = state.engine.tokenizer
    prompts = [prompt_token_ids(tokenizer, entry.card.render_translation_prompt(t), param="text") for t in texts]
    # The card's contract: the target follows the prompt and ends with EOS, so greedy until EOS by default.
    params = sampling_params(SamplingFields(max_tokens=body.max_tokens, temperature=body.temperature),
                             default_max_tokens=None)
    call = EngineCall(state, record_of(request.scope), entry, "tr")
    if state.settings.log_prompts:
        call.record.prompt = repr(texts)
    call.submit_all(prompts, params)
    if body.stream:
        return EventStreamResponse(_text_chunks(call, False, TokenText(tokenizer), indexed=True),
                                   on_close=call.close)
    await call.finish(request)
    translations = [{"text": run.sequences[0].text.strip(), "finish_reason": run.sequences[0].finish_reason}
                    for run in call.runs]
    if state.settings.log_prompts:
        call.record.output = repr([t["text"] for t in translations])
    return JSONResponse({"id": call.id, "model": entry.name, "source": langs.source, "target": langs.target,
                         "translations": translations, "usage": call.usage()})


