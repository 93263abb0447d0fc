"""OpenAI-compatible request and response bodies (completions, chat completions, models)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmservice.api.schemas.common import PromptInput, RequestBody, SamplingFields, Usage


class StreamOptions(RequestBody):
    include_usage: bool = False


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "base", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0},
        {"prompt": ["Hello", "The cat"], "n": 2, "max_tokens": 16, "temperature": 0.8, "seed": 1,
         "stream": True, "stream_options": {"include_usage": True}},
        {"prompt": [464, 3797], "max_tokens": 8, "logprobs": 2, "echo": True},
    ]})

    model: str | None = Field(None, description="Base model or adapter (default: the first that can generate).")
    prompt: PromptInput = Field(
        ..., description="A string, a list of strings, token ids, or a list of token-id lists.")
    max_tokens: int | None = 16
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, description="Top-n logprobs per token (0..20).")
    echo: bool = Field(False, description="Prepend the prompt to the completion (with its logprobs).")
    use_beam_search: bool = Field(False, description="vLLM's: beam search with best_of beams; the n best are the "
                                                     "choices (docs/api.md#beam-search).")
    best_of: int | None = Field(None, description="With use_beam_search: the number of beams (default: n).")
    user: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "base", "messages": [{"role": "system", "content": "You are terse."},
                                       {"role": "user", "content": "Say hello."}],
         "max_tokens": 32, "temperature": 0},
        {"messages": [{"role": "user", "content": "Tell a story."}], "stream": True, "max_tokens": 64},
    ]})

    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, description="Alias of max_tokens (newer OpenAI name).")
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, description="With logprobs: alternatives per token (0..20).")
    use_beam_search: bool = Field(False, description="vLLM's: beam search with n beams, all returned, best first "
                                                     "(docs/api.md#beam-search).")
    user: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "cmpl-3f2a", "object": "text_completion", "created": 1764300000, "model": "base",
        "choices": [{"index": 0, "text": " there was a cat", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}}]})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "chatcmpl-9b1c", "object": "chat.completion", "created": 1764300000, "model": "base",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}]})

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelInfo(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "sst2", "object": "model", "created": 1764300000, "owned_by": "lmservice", "parent": "base",
         "root": "base", "tasks": ["classify"], "max_model_len": 1024}]})

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmservice"
    parent: str | None = None
    root: str
    tasks: list[str]
    max_model_len: int


class ModelList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"object": "list", "data": [
        {"id": "base", "object": "model", "created": 1764300000, "owned_by": "lmservice", "parent": None,
         "root": "base", "tasks": ["generate"], "max_model_len": 1024},
        {"id": "sst2", "object": "model", "created": 1764300000, "owned_by": "lmservice", "parent": "base",
         "root": "base", "tasks": ["classify"], "max_model_len": 1024}]}]})

    object: Literal["list"] = "list"
    data: list[ModelInfo]
