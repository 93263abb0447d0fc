"""The adapters one server knows, and the device slots holding those its batches use."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmservice.kernels.lora import NO_SLOT, LoRAMapping, add_lora_embedding_torch
from lmservice.model.lora import LoRAAdapter, LoRATargets, load_lora_adapter
from lmservice.model.lora_slots import LoRASlotTable


class LoRAStore:
    """A registry name -> LoRAAdapter (CPU), and max_loras device slots in stacked per-module buffers.

    Buffers: for each module key some registered adapter targets, (lora_a (max_loras, rank, in),
    lora_b (max_loras, out, rank)) in the model's dtype on its device, the layout of lmservice/kernels/lora.py.
    `rank` is the largest rank registered so far: adding an adapter may grow it or add a module key, and
    then the buffers are replaced, so callers read them through `lora_weights(key)` each step.

    Invariants: slot s of every buffer holds exactly the weights of the adapter resident in slot s
    (zero-padded past its rank, all zero for a module it does not target or an empty slot); an adapter
    pinned by requests in flight stays registered and resident until its last unpin, even if removed.
    Not thread-safe: the engine thread owns it.
    """

    def __init__(
        self,
        targets: LoRATargets,
        max_loras: int,
        max_lora_rank: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.targets, self.shapes = targets, targets.shapes()
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.device, self.dtype = torch.device(device), dtype
        self.rank = 0
        self._adapters: dict[str, LoRAAdapter] = {}
        self._removing: set[str] = set()  # removed while pinned: dropped at the last unpin
        self._slots = LoRASlotTable(max_loras)
        self._buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- registry -----------------------------------------------------------------------------------

    def load(self, name: str, path: Path) -> LoRAAdapter:
        """Read `path` and register it as `name`; a broken directory raises LoRAAdapterError, changing nothing."""
        self._check_name_free(name)
        adapter = load_lora_adapter(path, self.targets, self.max_lora_rank, name=name)
        self.add(adapter)
        return adapter

    def add(self, adapter: LoRAAdapter) -> None:
        self._check_name_free(adapter.name)
        for key, (a, b) in adapter.weights.items():
            if key not in self.shapes or (a.shape[1], b.shape[0]) != self.shapes[key]:
                raise ValueError(f"adapter {adapter.name!r}: {key} does not fit this base model")
        if adapter.rank > self.max_lora_rank:
            raise ValueError(
                f"adapter {adapter.name!r}: rank {adapter.rank} is over max_lora_rank={self.max_lora_rank}"
            )
        self._grow_buffers(max(self.rank, adapter.rank), adapter.weights.keys())
        self._adapters[adapter.name] = adapter

    def remove(self, name: str) -> bool:
        """True: gone now. False: requests in flight still use it; it goes at their last unpin, and
        meanwhile new requests cannot name it. KeyError if unknown."""
        if name not in self:
            raise KeyError(name)
        if self._slots.pin_count(name) > 0:
            self._removing.add(name)
            return False
        self._drop(name)
        return True

    def __contains__(self, name: object) -> bool:
        """Registered and not being removed: what a new request may name."""
        return name in self._adapters and name not in self._removing

    def get(self, name: str) -> LoRAAdapter:
        return self._adapters[name]

    def names(self) -> list[str]:
        return [name for name in self._adapters if name not in self._removing]

    def resident_names(self) -> list[str]:
        """Adapters in device slots now, least recently used first."""
        return self._slots.lru_order()

    # --- requests in flight --------------------------------------------------------------------------

    def pin(self, name: str) -> None:
        """A request naming `name` starts; KeyError if unknown or being removed."""
        if name not in self:
            raise KeyError(name)
        self._slots.pin(name)

    def unpin(self, name: str) -> bool:
        """A request naming `name` ended. True when that was the last use of a removed adapter: it is gone now."""
        if self._slots.unpin(name) == 0 and name in self._removing:
            self._drop(name)
            return True
        return False

    # --- device slots --------------------------------------------------------------------------------

    def can_acquire(self, names: Iterable[str | None]) -> bool:
        """Whether `acquire(names)` would succeed now (the scheduler's admission test)."""
        return self._slots.can_assign(name for name in names if name is not None)

    def acquire(self, names: Sequence[str | None]) -> list[int]:
        """The slot of each name (None: no adapter -> -1), copying adapters that are not resident into free
        slots or those of least recently used unpinned adapters not asked for. Raises LoRASlotsFullError
        (nothing changes) when they do not fit, KeyError for an unknown name."""
        for name in names:
            if name is not None and name not in self._adapters:
                raise KeyError(name)
        slot_by_name, loads = self._slots.assign(name for name in names if name is not None)
        for name, slot in loads:
            self._write_slot(slot, self._adapters[name])
        return [NO_SLOT if name is None else slot_by_name[name] for name in names]

    def step_hook(self, mapping: LoRAMapping, add_lora: Callable[..., None]) -> LoRAStepHook | None:
        """The model's LoRA hook for one step, None when no token of it uses an adapter (nothing to add)."""
        if mapping.is_empty:
            return None
        return LoRAStepHook(dict(self._buffers), mapping, add_lora)

    def lora_weights(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(lora_a, lora_b) stacks of module `key`, or None when no registered adapter targets it."""
        return self._buffers.get(key)

    # --- internals -----------------------------------------------------------------------------------

    def _check_name_free(self, name: str) -> None:
        if name in self._adapters:
            state = "being removed" if name in self._removing else "already registered"
            raise ValueError(f"adapter name {name!r} is {state}")

    def _drop(self, name: str) -> None:
        slot = self._slots.release(name)
        if slot is not None:
            for lora_a, lora_b in self._buffers.values():
                lora_a[slot].zero_()
                lora_b[slot].zero_()
        del self._adapters[name]
        self._removing.discard(name)

    def _grow_buffers(self, rank: int, keys) -> None:
        """Zero stacks for new keys; wider stacks (old content copied, zero-padded) when rank grows."""
        if rank > self.rank:
            for key, (lora_a, lora_b) in list(self._buffers.items()):
                new_a, new_b = self._zero_stacks(key, rank)
                new_a[:, : self.rank].copy_(lora_a)
                new_b[:, :, : self.rank].copy_(lora_b)
                self._buffers[key] = (new_a, new_b)
            self.rank = rank
        for key in keys:
            if key not in self._buffers:
                self._buffers[key] = self._zero_stacks(key, self.rank)

    def _zero_stacks(self, key: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        in_features, out_features = self.shapes[key]
        lora_a = torch.zeros(
            self.max_loras, rank, in_features, device=self.device, dtype=self.dtype
        )  # (S, R, in)
        lora_b = torch.zeros(
            self.max_loras, out_features, rank, device=self.device, dtype=self.dtype
        )  # (S, out, R)
        return lora_a, lora_b

    def _write_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        for key, (lora_a, lora_b) in self._buffers.items():
            lora_a[slot].zero_()
            lora_b[slot].zero_()
            if key in adapter.weights:
                a, b = adapter.weights[key]  # (r, in), (out, r)
                lora_a[slot, : a.shape[0]].copy_(a)
                lora_b[slot, :, : b.shape[1]].copy_(b)


@dataclass(frozen=True)
class LoRAStepHook:
    """lmservice.model.gpt2's LoRAHook for one step: each projection (and embedding) adds the deltas of its
    tokens' adapters.

    Holds the store's buffers as they are when the step starts (adding an adapter may replace them, never
    during a step) and the step's LoRAMapping; `add_lora` is lmservice.kernels.lora.add_lora_torch or
    lmservice.kernels.triton_lora.add_lora_triton.
    """

    buffers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    mapping: LoRAMapping
    add_lora: Callable[..., None]

    def apply(self, module_key: str, x: torch.Tensor, y: torch.Tensor) -> None:
        stacks = self.buffers.get(module_key)
        if stacks is not None:  # no registered adapter targets this projection
            self.add_lora(y, x, stacks[0], stacks[1], self.mapping)

    def apply_embedding(self, module_key: str, indices: torch.Tensor, y: torch.Tensor) -> None:
        stacks = self.buffers.get(module_key)
        if stacks is not None:  # no registered adapter targets this embedding
            add_lora_embedding_torch(y, indices, stacks[0], stacks[1], self.mapping)
