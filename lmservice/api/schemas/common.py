"""Pieces every request and response schema shares: sampling fields, usage, the error object."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, get_args, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, Strict, create_model, field_validator

from lmservice.engine.sampling_params import SAMPLING_FIELDS, SamplingParams

# A token id in a request: a JSON integer, never `true`, `1.0` or `"1"` (pydantic's lax mode takes all three).
TokenId = Annotated[int, Strict()]
# A prompt or input: text, texts, token ids, or lists of token ids.
PromptInput = str | list[str] | list[TokenId] | list[list[TokenId]]


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


# JSON shapes other than SamplingParams' own (lmservice/serving/sampling.py converts them); null: the default.
# temperature may be null: its default depends on beam search (lmservice/serving/sampling.py).
_JSON_TYPES: dict[str, Any] = {"logit_bias": dict[str, float] | None, "stop": Any, "stop_token_ids": list[TokenId] | None,
                               "temperature": float | None}


def _sampling_field(name: str, description: str, param: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    json_type = _JSON_TYPES.get(name, hint)
    # a field that may be null defaults to null: the endpoint's default (max_tokens) or the engine's applies
    nullable = json_type is Any or type(None) in get_args(json_type)
    return json_type, Field(None if nullable else param.default, description=description or None)


_SAMPLING_HINTS = get_type_hints(SamplingParams)
_SAMPLING_PARAMS = {f.name: f for f in dataclasses.fields(SamplingParams)}

SamplingFields = create_model(
    "SamplingFields", __base__=RequestBody, __module__=__name__,
    __doc__="""Sampling parameters accepted by every generating endpoint: SAMPLING_FIELDS, with SamplingParams'
    types and defaults (lmservice/engine/sampling_params.py).

    Ranges are checked by SamplingParams.validate() so that a bad value is a 400 naming the
    parameter and its limit (the OpenAI convention), not a schema error; wrong JSON types,
    non-finite numbers and invalid Unicode are 422.
    """,
    **{name: _sampling_field(name, description, _SAMPLING_PARAMS[name], _SAMPLING_HINTS[name])
       for name, description in SAMPLING_FIELDS.items()},
    response_format=(dict[str, Any] | None, Field(
        None, description='OpenAI\'s: {"type": "json_object"} or {"type": "json_schema", "json_schema": '
                          '{"name", "schema", "strict"}} (docs/api.md#structured-output).')),
    structured_outputs=(dict[str, Any] | None, Field(
        None, description="vLLM's: exactly one of json (a JSON Schema), regex, choice (a list of strings), "
                          "grammar (Lark, or GBNF).")),
)


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
