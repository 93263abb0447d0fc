"""Every LoRA adapter the engine serves and all that is known about each one, in one owner.

One load of an adapter is `(name, load_id)`: adding a name that was removed makes another load, so the KV
cache (salted by load) and the score head of the old one are never mistaken for the new one's. The serving
layer above knows names only; the scheduler asks `can_acquire`, the engine asks `pin`/`release` per request
and `step_hook` per step, and the model runner reads classification heads through `score_head`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmservice.kernels.lora import LoRAMapping
from lmservice.model.lora import LoRAAdapter, LoRATargets
from lmservice.model.lora_store import LoRAStepHook, LoRAStore

AdapterKey = tuple[str, int | None]  # (name, load id): one load of an adapter
ScoreHead = tuple[torch.Tensor, torch.Tensor | None]  # (weight (num_labels, C), bias (num_labels,) or None)


@dataclass(frozen=True)
class _Load:
    load_id: int
    score_head: ScoreHead | None


class AdapterTable:
    """Load ids, request pins, device-slot residency and score heads of every adapter (and the base's head).

    The LoRA weights, their device slots and the pins live in a `LoRAStore` that nothing else holds.
    Invariants: a name is `in` the table (a new request may name it) exactly while it is loaded and not
    removed; a load keeps its weights and its score head until the last request pinned to it is released,
    even after `remove` (a name is refused by `load` until then). Not thread-safe: the engine thread owns it.
    """

    def __init__(self, targets: LoRATargets, max_loras: int, max_lora_rank: int, device: torch.device,
                 dtype: torch.dtype, base_score_head: ScoreHead | None = None) -> None:
        self.device, self.dtype = device, dtype
        self.targets, self.max_lora_rank = targets, max_lora_rank  # what an adapter is read against (read-only)
        self._store = LoRAStore(targets, max_loras, max_lora_rank, device, dtype)
        self._base_score_head = base_score_head
        self._loads: dict[str, _Load] = {}  # every name the store holds, removed-but-pinned ones included
        self._num_loads = 0

    # --- loading and removing (the serving layer, through the engine) ---
    def load(self, name: str, path: Path) -> LoRAAdapter:
        """Read a PEFT LoRA directory as `name` (with its score head, if it has one); a broken one, or a
        name in use, raises ValueError, changing nothing."""
        adapter = self._store.load(name, path)
        self._add_load(adapter)
        return adapter

    def add(self, adapter: LoRAAdapter) -> None:
        """Serve an adapter already read; ValueError, changing nothing, when it does not fit or its name is in use."""
        self._store.add(adapter)
        self._add_load(adapter)

    def _add_load(self, adapter: LoRAAdapter) -> None:
        head = None
        if adapter.score_weight is not None:
            bias = adapter.score_bias.to(self.device, self.dtype) if adapter.score_bias is not None else None
            head = (adapter.score_weight.to(self.device, self.dtype), bias)
        self._num_loads += 1
        self._loads[adapter.name] = _Load(self._num_loads, head)

    def remove(self, name: str) -> None:
        """New requests can no longer name it; requests in flight keep it until they end. KeyError if unknown."""
        if self._store.remove(name):
            del self._loads[name]

    def __contains__(self, name: object) -> bool:
        return name in self._store

    # --- requests in flight ---
    def pin(self, name: str) -> AdapterKey:
        """A request naming `name` starts: its load stays until `release`. KeyError if unknown or removed."""
        self._store.pin(name)
        return (name, self._loads[name].load_id)

    def release(self, key: AdapterKey) -> None:
        """The request pinned to `key` ended; a removed load goes with its last request."""
        if self._store.unpin(key[0]):
            del self._loads[key[0]]

    # --- each step ---
    def can_acquire(self, names: Sequence[str | None]) -> bool:
        """Whether these requests' adapters fit in the device slots together (the scheduler's admission test)."""
        return self._store.can_acquire(names)

    def step_hook(self, names: Sequence[str | None], num_tokens: Sequence[int],
                  add_lora: Callable[..., None]) -> LoRAStepHook | None:
        """The model's LoRA hook for a step whose rows use adapters `names` (None: the base) over `num_tokens`
        tokens each, their adapters placed in device slots; None when no row uses one."""
        if all(name is None for name in names):
            return None
        slots = self._store.acquire(names)
        return self._store.step_hook(LoRAMapping.from_seq_slots(slots, num_tokens, self.device), add_lora)

    def score_head(self, key: AdapterKey | None) -> ScoreHead | None:
        """The classification head of one load (None: the base model's), or None when it has none."""
        if key is None:
            return self._base_score_head
        load = self._loads.get(key[0])
        return load.score_head if load is not None and load.load_id == key[1] else None

    def resident_names(self) -> list[str]:
        """Adapters in device slots now, least recently used first."""
        return self._store.resident_names()
