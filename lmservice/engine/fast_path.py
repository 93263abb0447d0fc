"""The decode fast paths' one interface: a step the runner built, offered to the path chosen when the runner was.

Two paths implement it: CUDA graphs (cuda_graphs.py, on GPUs) and the whole step in one C call
(native_decode.py, on CPUs). Each serves pure decode steps without LoRA, up to a number of sequences;
every other step takes the op-by-op forward. The runner picks at most one of them when it is built
(model_runner.py) and asks it, each step, `can_run(batch)` before `run(batch)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from lmservice.model.gpt2 import LoRAHook


@dataclass(frozen=True)
class StepBatch:
    """One step's flat batch: the first `num_decodes` tokens are single-token decodes, one per sequence; the
    rest are prefill chunks packed back to back."""

    input_ids: list[int]  # (T,)
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64
    seq_lens: torch.Tensor  # (S,) int32, context length including this step's tokens
    block_tables: torch.Tensor  # (S, max_blocks) int32
    num_decodes: int
    lora: LoRAHook | None

    @property
    def is_plain_decode(self) -> bool:
        """Only decodes, no adapter: the steps a fast path is for."""
        return self.num_decodes == self.seq_lens.shape[0] and self.lora is None


class DecodeFastPath(Protocol):
    name: str  # for the start-up log: "cuda graphs", "C step"

    def can_run(self, batch: StepBatch) -> bool: ...

    def run(self, batch: StepBatch) -> torch.Tensor:
        """The final hidden states (num_decodes, n_embd) of a batch can_run accepted, its K/V written."""
        ...
