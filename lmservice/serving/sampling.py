"""Request fields -> SamplingParams: the one mapping, for the HTTP API and `lmservice generate` alike.

Both speak OpenAI's (and vLLM's) names; only the shapes JSON allows are converted
here (a single stop string, logit_bias keyed by strings). Ranges are checked
later, once, by RequestValidator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmservice.engine.outputs import RequestRejectedError
from lmservice.engine.sampling_params import SAMPLING_FIELDS, SamplingParams


def stop_list(value: Any) -> list[str]:
    """OpenAI's `stop`: null, a string or a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise RequestRejectedError(f"stop: must be a string or a list of strings, got {type(value).__name__}", "stop")


def logit_bias(value: Mapping[str, float] | None) -> dict[int, float] | None:
    """JSON object keys are strings: {"50256": -100} -> {50256: -100.0}."""
    if not value:
        return None
    try:
        return {int(k): float(v) for k, v in value.items()}
    except ValueError as e:
        raise RequestRejectedError("logit_bias: keys must be token ids", "logit_bias") from e


def beam_width(use_beam_search: bool, best_of: int | None, n: int) -> int:
    """num_beams from vLLM's extra fields on the OpenAI endpoints: use_beam_search searches with best_of beams
    (default: n) and returns the n best; without it best_of can only be 1 (there is no best-of-n sampling)."""
    if use_beam_search:
        return n if best_of is None else best_of
    if best_of not in (None, 1):
        raise RequestRejectedError("best_of: only with use_beam_search (best-of-n sampling is not supported), "
                                   f"got {best_of}", "best_of")
    return 1


def sampling_params(values: Mapping[str, Any], *, default_max_tokens: int | None, **extra: Any) -> SamplingParams:
    """SamplingParams from the SAMPLING_FIELDS present in `values` (absent or None: the defaults);
    `extra` sets the endpoint's own fields (n, logprobs, num_beams, ...). Beam search ranks the model's own
    log-probabilities, so with it an absent temperature is 0, not 1."""
    given = {name: values[name] for name in SAMPLING_FIELDS if values.get(name) is not None}
    if extra.get("num_beams", 1) > 1 or values.get("use_beam_search"):
        given.setdefault("temperature", 0.0)
    given["max_tokens"] = given.get("max_tokens", default_max_tokens)
    given["stop"] = stop_list(given.get("stop"))
    given["logit_bias"] = logit_bias(given.get("logit_bias"))
    given["stop_token_ids"] = list(given.get("stop_token_ids") or [])
    return SamplingParams(**given, **extra)
