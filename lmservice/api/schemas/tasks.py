"""Bodies of the task endpoints: generate, classify, translate."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lmservice.api.schemas.common import RequestBody, SamplingFields, Usage

# /v1/translate's beams when the request names none and is greedy (docs/benchmarks.md#beam-search: BLEU and
# cost on Multi30k val)
TRANSLATE_NUM_BEAMS = 2
BEAMS_DOC = "docs/api.md#beam-search"


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0},
        {"prompt": "The weather", "max_tokens": 64, "temperature": 0.7, "seed": 3, "stop": ["\n"],
         "logprobs": 2, "stream": True},
        {"prompt": "Once upon a time", "max_tokens": 32, "num_beams": 4, "length_penalty": 1.0},
    ]})

    model: str | None = Field(None, description="Base model or adapter (default: the first that can generate).")
    prompt: str = Field(..., description="Text to continue.")
    max_tokens: int | None = 64
    logprobs: int | None = Field(None, description="Return the logprob of each token and its top-n alternatives.")
    num_beams: int = Field(1, description=f"Beam search with this many beams when > 1; the best is returned ({BEAMS_DOC}).")
    stream: bool = False


class TopLogprob(BaseModel):
    token: str
    logprob: float


class TokenInfo(BaseModel):
    token: str
    token_id: int
    logprob: float
    top: list[TopLogprob]


class GenerateResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "gen-1a2b", "model": "base", "text": " there was a little dog.", "finish_reason": "stop",
        "usage": {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}, "logprobs": None}]})

    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage
    logprobs: list[TokenInfo] | None = None


class ClassifyRequest(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"text": "A wonderful, moving film."},
        {"model": "sst2", "text": ["Loved it.", "A waste of two hours."]},
    ]})

    model: str | None = Field(None, description="A classify model (default: the first one).")
    text: str | list[str] = Field(..., description="One text or a list.")


class ClassifyResult(BaseModel):
    label: str
    score: float
    scores: dict[str, float] = Field(..., description="Probability of every label.")


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "cls-77aa", "model": "sst2",
        "results": [{"label": "positive", "score": 0.97, "scores": {"negative": 0.03, "positive": 0.97}}],
        "usage": {"prompt_tokens": 6, "completion_tokens": 0, "total_tokens": 6}}]})

    id: str
    model: str
    results: list[ClassifyResult]
    usage: Usage


class TranslateRequest(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"text": "A man is riding a bike.", "source": "en", "target": "de"},
        {"model": "multi30k-en-de", "text": ["Two dogs play.", "A girl smiles."], "stream": True},
        {"text": "A man is riding a bike.", "num_beams": 1},
    ]})

    model: str | None = Field(None, description="A translate model (default: the first for source -> target).")
    text: str | list[str]
    source: str | None = Field(None, description="Source language code; must match the model's card.")
    target: str | None = Field(None, description="Target language code; must match the model's card.")
    max_tokens: int | None = Field(None, description="Default: until EOS, within the context.")
    temperature: float = Field(0.0, description="Greedy by default.")
    num_beams: int | None = Field(None, description=f"Beam search with this many beams (1: none). Default: "
                                  f"{TRANSLATE_NUM_BEAMS} when greedy, 1 with a temperature ({BEAMS_DOC}).")
    length_penalty: float = Field(1.0, description="Beam search: a finished beam scores sum(logprobs) / "
                                                   "generated_tokens**length_penalty.")
    early_stopping: bool | str = Field(False, description='Beam search: true, false or "never" (as transformers).')
    stream: bool = False


class Translation(BaseModel):
    text: str
    finish_reason: str | None


class TranslateResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "tr-5c3d", "model": "multi30k-en-de", "source": "en", "target": "de",
        "translations": [{"text": "Ein Mann fährt Fahrrad.", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 14, "completion_tokens": 8, "total_tokens": 22}}]})

    id: str
    model: str
    source: str
    target: str
    translations: list[Translation]
    usage: Usage
