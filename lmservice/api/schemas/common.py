"""Pieces every request and response schema shares: sampling fields, usage, the error object."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _invalid_unicode_at(value: Any, path: str) -> str | None:
    """Where in a parsed JSON value a string holds a lone UTF-16 surrogate (JSON's "\\ud800"), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{path}[{e.start}]" if path else f"[{e.start}]"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = _invalid_unicode_at(key, path) if isinstance(key, str) else None
        where = where or _invalid_unicode_at(item, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]")
        if where:
            return where
    return None


class RequestBody(BaseModel):
    """Base of every request body: unknown fields, non-finite numbers (JSON's 1e999 parses as infinity)
    and strings that are not valid Unicode are refused with 422 before any route code runs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        where = _invalid_unicode_at(value, "")
        if where is not None:
            raise ValueError(f"must be valid Unicode text (a lone surrogate at {where.lstrip('.')})")
        return value


class SamplingFields(RequestBody):
    """Sampling parameters accepted by every generating endpoint (OpenAI names, plus vLLM's extras).

    Ranges are checked by SamplingParams.validate() so that a bad value is a 400 naming the
    parameter and its limit (the OpenAI convention), not a schema error; wrong JSON types,
    non-finite numbers and invalid Unicode are 422.
    """

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
    response_format: dict[str, Any] | None = Field(
        None, description='OpenAI\'s: {"type": "json_object"} or {"type": "json_schema", "json_schema": '
                          '{"name", "schema", "strict"}} (docs/api.md#structured-output).')
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM's: exactly one of json (a JSON Schema), regex, choice (a list of strings), "
                          "grammar (Lark, or GBNF).")


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
