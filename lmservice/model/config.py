"""The GPT-2 model config, read from a checkpoint's `config.json` (never guessed from a name)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmservice.kernels.activation import TANH_GELU

_ACTIVATIONS = (*TANH_GELU, "gelu", "relu")
_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2ForSequenceClassification", "GPT2Model")


class ModelConfigError(ValueError):
    """A checkpoint that lmservice cannot serve; the message names the file and the field."""


@dataclass(frozen=True)
class GPT2Config:
    """The fields of a GPT-2 `config.json` that change the computation."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    activation_function: str
    layer_norm_epsilon: float
    scale_attn_weights: bool
    scale_attn_by_inverse_layer_idx: bool
    tie_word_embeddings: bool
    architectures: tuple[str, ...]
    num_labels: int
    id2label: dict[int, str]
    eos_token_id: int | None
    bos_token_id: int | None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_classifier(self) -> bool:
        return "GPT2ForSequenceClassification" in self.architectures

    @classmethod
    def from_dir(cls, model_dir: Path) -> GPT2Config:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{path}: not found (a model directory needs a Hugging Face config.json)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path}: not valid JSON: {e}") from e
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> GPT2Config:
        def field(name: str, default: object = None, kind: type = int) -> object:
            value = raw.get(name, default)
            if value is None:
                raise ModelConfigError(f"{source}: field `{name}` is missing")
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ModelConfigError(f"{source}: field `{name}` must be a positive integer, got {value!r}")
            return value

        model_type = raw.get("model_type")
        if model_type != "gpt2":
            raise ModelConfigError(
                f"{source}: field `model_type` is {model_type!r}; lmservice serves GPT-2-family models (model_type 'gpt2')")
        architectures = tuple(raw.get("architectures") or ("GPT2LMHeadModel",))
        unknown = [a for a in architectures if a not in _ARCHITECTURES]
        if unknown:
            raise ModelConfigError(f"{source}: field `architectures` has {unknown}; supported: {list(_ARCHITECTURES)}")
        n_embd, n_head = field("n_embd", 768), field("n_head", 12)
        if n_embd % n_head:
            raise ModelConfigError(f"{source}: field `n_embd` ({n_embd}) is not divisible by `n_head` ({n_head})")
        activation = raw.get("activation_function", "gelu_new")
        if activation not in _ACTIVATIONS:
            raise ModelConfigError(f"{source}: field `activation_function` is {activation!r}; supported: {list(_ACTIVATIONS)}")
        if raw.get("add_cross_attention"):
            raise ModelConfigError(f"{source}: field `add_cross_attention` is set; cross-attention is not supported")
        id2label = {int(k): str(v) for k, v in (raw.get("id2label") or {}).items()}
        num_labels = int(raw.get("num_labels", len(id2label) or 2))
        return cls(
            vocab_size=field("vocab_size", 50257),
            n_positions=field("n_positions", 1024),
            n_embd=n_embd,
            n_layer=field("n_layer", 12),
            n_head=n_head,
            n_inner=raw.get("n_inner") or 4 * n_embd,
            activation_function=activation,
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
            scale_attn_weights=bool(raw.get("scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(raw.get("scale_attn_by_inverse_layer_idx", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            architectures=architectures,
            num_labels=len(id2label) if id2label else num_labels,
            id2label=id2label,
            eos_token_id=raw.get("eos_token_id"),
            bos_token_id=raw.get("bos_token_id"),
        )
