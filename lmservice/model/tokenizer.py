"""The serving side of a Hugging Face tokenizer directory, on the `tokenizers` library alone.

The server needs encode, decode, the special tokens and the chat template; importing transformers for
them cost a second of start-up (docs/benchmarks.md), so they are read here from the same files:
`tokenizer.json` (or a GPT-2 `vocab.json` + `merges.txt`), `tokenizer_config.json` and
`special_tokens_map.json`. The training jobs keep transformers' tokenizers; tests/model/test_tokenizer.py
checks that both give the same ids, text and chat prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from lmservice.model.config import ModelConfigError


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """encode / decode / special tokens / chat template of one model directory. Immutable after loading,
    so any thread may use it."""

    def __init__(self, backend: Backend, *, eos_token: str | None, bos_token: str | None = None,
                 chat_template: str | None = None) -> None:
        self._backend = backend
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token is not None else None
        self.chat_template = chat_template
        self._template = None

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        model_dir = Path(model_dir)
        if (model_dir / "tokenizer.json").is_file():
            backend = Backend.from_file(str(model_dir / "tokenizer.json"))
        elif (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
            # A stock GPT-2 checkpoint: byte-level BPE, no prefix space, <|endoftext|> special.
            backend = Backend(models.BPE.from_file(str(model_dir / "vocab.json"), str(model_dir / "merges.txt")))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
        else:
            raise ModelConfigError(f"{model_dir}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
            path = model_dir / name
            if path.is_file():
                try:
                    config.update(json.loads(path.read_text()))
                except json.JSONDecodeError as e:
                    raise ModelConfigError(f"{path}: not valid JSON ({e})") from e
        eos = _token_text(config.get("eos_token"))
        if eos is None and backend.token_to_id("<|endoftext|>") is not None:
            eos = "<|endoftext|>"  # GPT-2's, when no config names one
        specials = [t for t in (eos, _token_text(config.get("bos_token"))) if t is not None]
        backend.add_special_tokens([t for t in specials if backend.token_to_id(t) is not None])
        template = config.get("chat_template")
        if template is None and (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text()
        return cls(backend, eos_token=eos, bos_token=_token_text(config.get("bos_token")),
                   chat_template=template if isinstance(template, str) else None)

    @property
    def backend_tokenizer(self) -> Backend:
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        """Render `messages` with the model's Jinja chat template, in a sandbox (templates are data that
        came with a checkpoint), with the names templates expect: messages, add_generation_prompt,
        bos_token, eos_token, raise_exception."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if tokenize:
            raise ValueError("tokenize=True is not supported: encode the rendered text")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment  # only for chat templates

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(message: str) -> None:
                raise ValueError(message)

            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")
