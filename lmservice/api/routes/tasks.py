"""Task endpoints (generate, classify, translate): /v1/generate, /v1/classify, /v1/translate.

Each takes "model" to pick the base model or an adapter; without it the first
model able to do the task answers (for translate: the first whose languages match).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request

from lmservice.api.auth import require_api_key, server_state
from lmservice.api.engine_client import EngineCall
from lmservice.api.errors import APIError
from lmservice.api.logprobs import TokenText, native_logprobs
from lmservice.api.schemas.common import ERROR_RESPONSES
from lmservice.api.schemas.tasks import (
    TRANSLATE_NUM_BEAMS,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    GenerateRequest,
    GenerateResponse,
    TranslateRequest,
    TranslateResponse,
    Translation,
)
from lmservice.api.submission import Submission
from lmservice.engine.sampling_params import SamplingParams
from lmservice.serving.sampling import sampling_params

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["tasks"])


def _responses(stream_example: str | None = None) -> dict:
    if not stream_example:
        return ERROR_RESPONSES
    return {200: {"content": {"text/event-stream": {"example": stream_example}}}, **ERROR_RESPONSES}


def _texts(text: str | list[str]) -> list[str]:
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise APIError(400, "text: must not be an empty list", param="text")
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
    yield {"id": call.id, "model": call.entry.name, "text": "", "finish_reason": None,
           "usage": call.usage().model_dump()}


# ---------------------------------------------------------------- generate


@router.post("/v1/generate", response_model=GenerateResponse, responses=_responses(
    'data: {"id": "gen-1a2b", "text": " there", "finish_reason": null}\n\n'
    'data: {"id": "gen-1a2b", "text": "", "finish_reason": null, "usage": {...}}\n\ndata: [DONE]\n\n'))
async def generate(body: GenerateRequest, request: Request):
    engine, models = server_state(request).started()
    sub = Submission.open(request, models.resolve(body.model, "generate"), "gen")
    await sub.constrain(dict(body))
    call = sub.submit(await sub.tokenize([body.prompt]), sampling_params(dict(body), default_max_tokens=64,
                                                                   logprobs=body.logprobs, num_beams=body.num_beams))
    token_text = TokenText(engine.tokenizer)

    def build() -> GenerateResponse:
        seq = call.runs[0].sequences[0]
        call.log_output(seq.text)
        return GenerateResponse(
            id=call.id, model=call.entry.name, text=seq.text, finish_reason=seq.finish_reason, usage=call.usage(),
            logprobs=native_logprobs(token_text, seq.logprobs) if body.logprobs is not None else None)

    chunks = _text_chunks(call, body.logprobs is not None, token_text, indexed=False) if body.stream else None
    return await call.respond(request, chunks, build)


# ---------------------------------------------------------------- classify


@router.post("/v1/classify", response_model=ClassifyResponse, responses=_responses())
async def classify(body: ClassifyRequest, request: Request):
    _, models = server_state(request).started()
    sub = Submission.open(request, models.resolve(body.model, "classify"), "cls")
    labels = list(sub.entry.card.labels or [])
    # Classification is one prefill: nothing is sampled, so the params only carry the defaults.
    call = sub.submit(await sub.tokenize(_texts(body.text), param="text"), SamplingParams(max_tokens=0, temperature=0.0),
                      task="classify")

    def build() -> ClassifyResponse:
        results = []
        for run in call.runs:
            scores = run.scores or []
            if len(scores) != len(labels) or not scores:
                raise APIError(500, f"model {call.entry.name!r} returned {len(scores)} scores for {len(labels)} labels")
            best = max(range(len(scores)), key=scores.__getitem__)
            results.append(ClassifyResult(label=labels[best], score=scores[best],
                                          scores=dict(zip(labels, scores, strict=True))))
        call.log_output([r.label for r in results])
        return ClassifyResponse(id=call.id, model=call.entry.name, results=results, usage=call.usage())

    return await call.respond(request, None, build)


# ---------------------------------------------------------------- translate


@router.post("/v1/translate", response_model=TranslateResponse, responses=_responses(
    'data: {"id": "tr-5c3d", "index": 0, "text": " Ein", "finish_reason": null}\n\n'
    'data: [DONE]\n\n'))
async def translate(body: TranslateRequest, request: Request):
    engine, models = server_state(request).started()
    sub = Submission.open(request, models.resolve_translation(body.model, body.source, body.target), "tr")
    card = sub.entry.card
    texts = _texts(body.text)
    prompts = await sub.tokenize([card.render_translation_prompt(t) for t in texts], param="text")
    sub.recorder.log_prompt(texts)
    # The card's contract: the target follows the prompt and ends with EOS, so until EOS by default, with
    # TRANSLATE_NUM_BEAMS beams unless the request samples.
    num_beams = body.num_beams
    if num_beams is None:
        num_beams = TRANSLATE_NUM_BEAMS if body.temperature == 0 else 1
    call = sub.submit(prompts, sampling_params(
        {"max_tokens": body.max_tokens, "temperature": body.temperature, "length_penalty": body.length_penalty,
         "early_stopping": body.early_stopping}, default_max_tokens=None, num_beams=num_beams))

    def build() -> TranslateResponse:
        translations = [Translation(text=run.sequences[0].text.strip(), finish_reason=run.sequences[0].finish_reason)
                        for run in call.runs]
        call.log_output([t.text for t in translations])
        return TranslateResponse(id=call.id, model=call.entry.name, source=card.languages.source,
                                 target=card.languages.target, translations=translations, usage=call.usage())

    chunks = _text_chunks(call, False, TokenText(engine.tokenizer), indexed=True) if body.stream else None
    return await call.respond(request, chunks, build)
