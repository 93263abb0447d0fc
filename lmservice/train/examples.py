"""Tokenized examples with a loss mask, and the collator that pads them.

A prompt/completion example trains on the completion only: its tokens are
`prompt_ids + completion_ids + [eos]` with labels -100 over the prompt. The
prompt and the completion are tokenized separately, because at inference the
server tokenizes the rendered prompt alone and the model generates what follows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from lmservice.train.data import DataError

IGNORE_INDEX = -100  # the label transformers' losses skip


def encode_prompt_completion(ds: Dataset, tokenizer: PreTrainedTokenizerBase,
                             prompt_fn: Callable[[dict], str], completion_fn: Callable[[dict], str],
                             max_length: int) -> Dataset:
    """input_ids/labels per row; rows longer than `max_length` tokens are dropped (counted in the error)."""
    eos = tokenizer.eos_token_id

    def encode(batch: dict) -> dict:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        prompts = tokenizer([prompt_fn(r) for r in rows], add_special_tokens=False)["input_ids"]
        completions = tokenizer([completion_fn(r) for r in rows], add_special_tokens=False)["input_ids"]
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for p, c in zip(prompts, completions, strict=True):
            ids = p + c + [eos]
            if len(ids) > max_length:
                continue
            out["input_ids"].append(ids)
            out["labels"].append([IGNORE_INDEX] * len(p) + c + [eos])
        return out

    encoded = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names)
    if len(encoded) == 0:
        raise DataError(f"every example is longer than --max-length {max_length} tokens")
    return encoded


def encode_texts(ds: Dataset, tokenizer: PreTrainedTokenizerBase, text_column: str, max_length: int,
                 extra: Callable[[dict], dict[str, list]] | None = None) -> Dataset:
    """input_ids of `text_column` (truncated to `max_length`), plus the columns `extra(batch)` returns."""

    def encode(batch: dict) -> dict:
        ids = tokenizer(batch[text_column], add_special_tokens=False, truncation=True,
                        max_length=max_length)["input_ids"]
        return {"input_ids": ids, **(extra(batch) if extra is not None else {})}

    encoded = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names)
    empty = sum(1 for ids in encoded["input_ids"] if not ids)
    if empty:
        raise DataError(f"{empty} example(s) have an empty `{text_column}`")
    return encoded


def pack(ds: Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int) -> Dataset:
    """Token blocks of exactly `block_size` (input_ids == labels; the model shifts the labels).

    Each text is followed by EOS, the texts are concatenated, and the stream is
    cut into blocks (each 2000-text chunk's tail shorter than a block is dropped),
    so every training token is a real token and no padding is needed.
    """
    eos = tokenizer.eos_token_id

    def tokenize_and_group(batch: dict) -> dict:
        ids: list[int] = []
        for seq in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(eos)
        n = len(ids) // block_size * block_size
        blocks = [ids[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    packed = ds.map(tokenize_and_group, batched=True, batch_size=2000, remove_columns=ds.column_names)
    if len(packed) == 0:
        raise DataError(f"not enough text for one block of {block_size} tokens")
    return packed.with_format("torch")


class PadCollator:
    """Right-pads `input_ids` (pad id) and `labels` (-100 when they are sequences) to the batch's longest.

    Scalar `labels` (classification) are stacked as they are. `attention_mask`
    marks real tokens, so padding never changes a real token's output.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        longest = max(lengths)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)  # (B, T)
        for i, f in enumerate(features):
            input_ids[i, : lengths[i]] = torch.as_tensor(f["input_ids"])
            attention_mask[i, : lengths[i]] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "labels" in features[0]:
            first = features[0]["labels"]
            if isinstance(first, list | tuple) or (torch.is_tensor(first) and first.dim() == 1):
                labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
                for i, f in enumerate(features):
                    labels[i, : lengths[i]] = torch.as_tensor(f["labels"])
            else:
                labels = torch.as_tensor([int(f["labels"]) for f in features], dtype=torch.long)  # (B,)
            batch["labels"] = labels
        return batch
