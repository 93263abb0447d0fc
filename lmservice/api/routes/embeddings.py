"""/v1/embeddings (OpenAI's shape): the final hidden states of a language model, mean-pooled over every
input token and L2-normalised, computed by the engine in the same batches as everything else (one
prefill each, like classify; nothing sampled). See docs/api.md#embeddings.
"""

from __future__ import annotations

import base64
import struct

from fastapi import APIRouter, Depends, Request

from lmservice.api.auth import require_api_key, server_state
from lmservice.api.errors import APIError
from lmservice.api.schemas.common import ERROR_RESPONSES
from lmservice.api.schemas.embeddings import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from lmservice.api.submission import Submission
from lmservice.engine.sampling_params import SamplingParams

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])


def _inputs(value: str | list) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError(400, "input: must not be an empty list", param="input")
    if all(isinstance(v, int) for v in value):
        return [list(value)]  # one prompt of token ids
    return list(value)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
async def embeddings(body: EmbeddingRequest, request: Request):
    _, models = server_state(request).started()
    sub = Submission.open(request, models.resolve(body.model, "embed"), "embd")
    if body.dimensions is not None:
        raise APIError(400, f"dimensions: not supported; the model's embeddings have its hidden size "
                            f"({sub.entry.name})", param="dimensions")
    call = sub.submit(await sub.tokenize(_inputs(body.input), param="input"), SamplingParams(max_tokens=0, temperature=0.0),
                      task="embed")

    def build() -> EmbeddingResponse:
        num_prompt_tokens = call.usage().prompt_tokens
        data = [Embedding(index=i, embedding=_encode(run.embedding or [], body.encoding_format))
                for i, run in enumerate(call.runs)]
        return EmbeddingResponse(data=data, model=call.entry.name,
                                 usage=EmbeddingUsage(prompt_tokens=num_prompt_tokens, total_tokens=num_prompt_tokens))

    return await call.respond(request, None, build)
