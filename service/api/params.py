"""Request bodies -> SamplingParams and prompt token ids, with 400s that name the bad parameter."""

from __future__ import annotations

from typing import Any

from service.api.errors import APIError
from service.api.schemas.common import SamplingFields
from service.engine.sampling_params import SamplingParams


def stop_list(value: Any) -> list[str]:
    """OpenAI's `stop`: null, a string or a list of strings (anything else is a 400, not a 422)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise APIError(400, f"stop: must be a string or a list of strings, got {type(value).__name__}", param="stop")


def check_num_prompts(num: int, limit: int, param: str) -> None:
    """The operator's cap on prompts (or texts) in one HTTP request, checked before any is tokenized."""
    if num > limit:
        raise APIError(400, f"{param}: at most {limit} prompts in one request (--max-prompts-per-request), "
                            f"got {num}", param=param)


def logit_bias(value: dict[str, float] | None) -> dict[int, float] | None:
    if not value:
        return None
    try:
        return {int(k): float(v) for k, v in value.items()}
    except ValueError as e:
        raise APIError(400, "logit_bias: keys must be token ids", param="logit_bias") from e


def sampling_params(body: SamplingFields, *, default_max_tokens: int | None, **extra: Any) -> SamplingParams:
    """SamplingParams from the shared fields; `extra` sets the endpoint-specific ones (n, logprobs, ...)."""
    return SamplingParams(
        max_tokens=body.max_tokens if body.max_tokens is not None else default_max_tokens,
        min_tokens=body.min_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=logit_bias(body.logit_bias),
        seed=body.seed,
        stop=stop_list(body.stop),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        **extra,
    )


def prompt_token_ids(tokenizer: Any, prompt: str | list[int], param: str = "prompt") -> list[int]:
    """Token ids of a text prompt, or the ids given directly (the engine checks them against the vocabulary)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise APIError(400, f"{param}: the prompt is empty", param=param)
    return ids
