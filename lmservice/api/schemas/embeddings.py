"""Bodies of /v1/embeddings (OpenAI's shape)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lmservice.api.schemas.common import PromptInput, RequestBody


class EmbeddingRequest(RequestBody):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [
        {"model": "base", "input": "once upon a time"},
        {"input": ["a dog runs", "a cat sleeps"], "encoding_format": "base64"},
    ]})

    model: str | None = Field(None, description="A model that can embed (default: the base model).")
    input: PromptInput = Field(
        ..., description="A string, a list of strings, token ids, or a list of token-id lists.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector as little-endian float32 bytes, base64-encoded (as OpenAI).")
    dimensions: int | None = Field(None, description="Not supported: the vector has the model's hidden size.")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "object": "list", "model": "base", "usage": {"prompt_tokens": 4, "total_tokens": 4},
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0123, -0.0456, 0.0789]}]}]})

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
