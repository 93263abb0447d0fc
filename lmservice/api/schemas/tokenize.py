"""Bodies of /tokenize and /detokenize (vLLM's fields)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmservice.api.schemas.common import RequestBody, TokenId
from lmservice.api.schemas.openai import ChatMessage


class TokenizeRequest(RequestBody):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={"examples": [
        {"prompt": "once upon a time"},
        {"model": "base", "messages": [{"role": "user", "content": "hi"}], "return_token_strs": True},
    ]})

    model: str | None = Field(None, description="Any served model or adapter (they share the tokenizer).")
    prompt: str | None = Field(None, description="Text to tokenize; or `messages`.")
    messages: list[ChatMessage] | None = Field(None, description="A chat, rendered as /v1/chat/completions does.")
    add_special_tokens: bool = True
    add_generation_prompt: bool = Field(True, description="With `messages`: end with the assistant's turn.")
    return_token_strs: bool = Field(False, description="Also return each token as a string.")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self


class TokenizeResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"count": 4, "max_model_len": 256, "tokens": [280, 1427, 258, 402], "token_strs": None}]})

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"tokens": [1, 2, 3]}]})

    model: str | None = None
    tokens: list[TokenId] = Field(..., description="Token ids, each in the vocabulary.")


class DetokenizeResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "once upon a time"}]})

    prompt: str
