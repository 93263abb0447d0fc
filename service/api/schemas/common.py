"""Pieces every request and response schema shares: sampling fields, usage, the error object."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SamplingFields(BaseModel):
    """Sampling parameters accepted by every generating endpoint (OpenAI names, plus vLLM's extras).

    Ranges are checked by SamplingParams.validate() so that a bad value is a 400 naming the
    parameter (the OpenAI convention), not a schema error; only wrong JSON types are 422.
    """

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, description="Most tokens to generate (default: per endpoint).")
    temperature: float = Field(1.0, description="0 is greedy.")
    top_p: float = 1.0
    top_k: int = Field(0, description="0 or -1: off.")
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100].")
    seed: int | None = Field(None, description="Per-request sampling seed: same seed, same tokens.")
    stop: Any = Field(None, description="A string or a list of strings; never part of the output.")
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The one error shape of every endpoint."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"error": {
        "message": "max_tokens: must be >= 0, got -1", "type": "invalid_request_error",
        "param": "max_tokens", "code": None}}]})

    error: ErrorObject


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "Invalid parameter (e.g. prompt + max_tokens over the context)"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (422, "Malformed JSON or wrong types"),
        (429, "Waiting queue full; retry after Retry-After seconds"),
        (503, "Not ready or draining"),
    )
}
