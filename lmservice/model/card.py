"""The model card, `lmservice.json`: what a checkpoint or adapter directory is for.

The training jobs write it; the server reads it. A stock checkpoint or PEFT
adapter without a card is a plain `generate` model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CARD_FILE = "lmservice.json"
Task = Literal["generate", "classify", "translate"]


class Languages(BaseModel):
    source: str
    target: str


class ModelCard(BaseModel):
    """Task and task data of one artifact.

    translate: `prompt_template` holds `{text}` where the source sentence goes; the
    target follows the prompt and ends with the tokenizer's EOS token.
    classify: `labels[i]` names the score head's output i.
    """

    model_config = ConfigDict(extra="allow")

    format: int = 1
    task: Task = "generate"
    labels: list[str] | None = None
    prompt_template: str | None = None
    languages: Languages | None = None
    base_model: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_task_fields(self) -> ModelCard:
        if self.task == "classify" and not self.labels:
            raise ValueError("a classify card needs `labels`")
        if self.task == "translate":
            if not self.prompt_template or "{text}" not in self.prompt_template:
                raise ValueError("a translate card needs a `prompt_template` containing {text}")
            if self.languages is None:
                raise ValueError("a translate card needs `languages` (source, target)")
        return self

    @classmethod
    def default(cls, labels: list[str] | None) -> ModelCard:
        """The card of an artifact that has none: a classifier when it has a score head (its labels),
        otherwise a plain `generate` model."""
        return cls(task="classify", labels=labels) if labels else cls(task="generate")

    def render_translation_prompt(self, text: str) -> str:
        assert self.prompt_template is not None
        return self.prompt_template.replace("{text}", text)

    @classmethod
    def load(cls, directory: Path) -> ModelCard | None:
        """The card of `directory`, or None when it has none. A broken card is an error."""
        path = Path(directory) / CARD_FILE
        if not path.exists():
            return None
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (json.JSONDecodeError, ValidationError) as e:
            raise ValueError(f"{path}: invalid model card: {e}") from e

    def save(self, directory: Path) -> None:
        (Path(directory) / CARD_FILE).write_text(self.model_dump_json(indent=2, exclude_none=True) + "\n")
