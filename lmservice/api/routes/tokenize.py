"""/tokenize and /detokenize (vLLM's shapes): count and inspect tokens without generating.

Every served model and adapter shares the base model's tokenizer; `model` is checked (404 when unknown)
so that a client's request means the same here as on /v1/completions.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from lmservice.api.auth import require_api_key, server_state
from lmservice.api.chat import render_chat_prompt
from lmservice.api.errors import APIError
from lmservice.api.schemas.common import ERROR_RESPONSES
from lmservice.api.schemas.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["tokenize"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = server_state(request)
    engine, models = state.started()
    models.get(body.model)
    tokenizer = engine.tokenizer
    if body.messages is not None:  # rendered off the loop, like the encode
        text = await state.tokenizing.run(render_chat_prompt, tokenizer, body.messages, body.add_generation_prompt)
        param = "messages"
    else:
        text, param = body.prompt, "prompt"
    ids = (await state.tokenizing.encode([text], param, add_special_tokens=body.add_special_tokens))[0]
    strs = [tokenizer.convert_ids_to_tokens(t) for t in ids] if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    engine, models = server_state(request).started()
    models.get(body.model)
    vocab = engine.validator.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"tokens: token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    prompt = await server_state(request).tokenizing.run(engine.tokenizer.decode, body.tokens)  # off the loop
    return DetokenizeResponse(prompt=prompt)
