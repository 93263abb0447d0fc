"""Batched LoRA: each token of a batch adds the low-rank delta of its own adapter.

For a projection y = x @ W (+ b) and token t using adapter slot s:

    y[t] += (x[t] @ lora_a[s].T) @ lora_b[s].T

Stacked layout (NOTE: shared by the torch path, the Triton kernels and the adapter store):
    lora_a: (num_slots, max_rank, in_features)
    lora_b: (num_slots, out_features, max_rank), the LoRA scaling (alpha/r or alpha/sqrt(r)) folded in.
    An adapter of rank r < max_rank fills rows/columns [:r] and leaves the rest zero, so adapters of
    different ranks share one stack and the padding adds exactly nothing.

`LoRAMapping` says which slot each token of a step uses; the engine builds it once per step on the host
and every projection of the forward reuses it. The torch function here is the reference the Triton
kernels are tested against and the CPU path of the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise

import torch

NO_SLOT = -1  # a token without adapter: no delta


@dataclass(frozen=True, eq=False)
class LoRAMapping:
    """The adapter slot of every token of one step.

    Invariants: `segments` are (start, length, slot) runs of consecutive tokens sharing one slot >= 0,
    in token order, non-overlapping; tokens of slot -1 belong to no segment. `token_slots[t]` agrees
    with them. The derived forms (`groups`, `segment_tensors`) are computed on first use and cached,
    so a forward over many projections pays for them once.
    """

    token_slots: torch.Tensor  # (num_tokens,) int32 on the device; -1 = no adapter
    segments: tuple[tuple[int, int, int], ...]  # (start, length, slot), slot >= 0

    @classmethod
    def from_seq_slots(
        cls, seq_slots: Sequence[int], query_lens: Sequence[int], device: torch.device | str
    ) -> LoRAMapping:
        """One segment per sequence: sequence i contributes query_lens[i] consecutive tokens of slot
        seq_slots[i] (-1: no adapter). This is what the engine knows on the host each step."""
        segments = []
        start = 0
        for slot, length in zip(seq_slots, query_lens, strict=True):
            if slot >= 0 and length > 0:
                segments.append((start, length, slot))
            start += length
        token_slots = torch.repeat_interleave(
            torch.tensor(seq_slots, dtype=torch.int32), torch.tensor(query_lens, dtype=torch.int64)
        )  # (num_tokens,)
        return cls(token_slots.to(device), tuple(segments))

    @classmethod
    def from_token_slots(
        cls, token_slots: Sequence[int] | torch.Tensor, device: torch.device | str
    ) -> LoRAMapping:
        """Segments are the maximal runs of equal slots (one host sync if a device tensor is given)."""
        slots = token_slots.tolist() if isinstance(token_slots, torch.Tensor) else list(token_slots)
        segments = []
        start = 0
        for t in range(1, len(slots) + 1):
            if t == len(slots) or slots[t] != slots[start]:
                if slots[start] >= 0:
                    segments.append((start, t - start, slots[start]))
                start = t
        return cls(torch.tensor(slots, dtype=torch.int32, device=device), tuple(segments))

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    @property
    def is_empty(self) -> bool:
        """No token uses an adapter: the LoRA hook has nothing to add."""
        return not self.segments

    @property
    def max_seg_len(self) -> int:
        return max((length for _, length, _ in self.segments), default=0)

    @cached_property
    def single_slot(self) -> int | None:
        """The slot every token uses, or None (mixed slots, or some tokens without adapter)."""
        slots = {slot for _, _, slot in self.segments}
        if len(slots) == 1 and sum(length for _, length, _ in self.segments) == self.num_tokens:
            return slots.pop()
        return None

    @cached_property
    def groups(self) -> tuple[tuple[int, slice | torch.Tensor], ...]:
        """(slot, rows) for each distinct slot present, ascending: rows is a slice when the slot's tokens
        are contiguous (a batch ordered by adapter), else their indices, (n,) int64 on the device."""
        segments_by_slot: dict[int, list[tuple[int, int]]] = {}
        for start, length, slot in self.segments:
            segments_by_slot.setdefault(slot, []).append((start, length))
        device = self.token_slots.device
        groups = []
        for slot in sorted(segments_by_slot):
            runs = segments_by_slot[slot]
            if all(start == prev_start + prev_len for (prev_start, prev_len), (start, _) in pairwise(runs)):
                rows: slice | torch.Tensor = slice(runs[0][0], runs[-1][0] + runs[-1][1])
            else:
                rows = torch.cat([torch.arange(start, start + length) for start, length in runs]).to(device)
            groups.append((slot, rows))
        return tuple(groups)

    @cached_property
    def segment_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(seg_starts, seg_lens, seg_slots), each (num_segments,) int32 on the device."""
        table = torch.tensor(self.segments, dtype=torch.int32).reshape(-1, 3)  # (num_segments, 3)
        table = table.to(self.token_slots.device)
        return table[:, 0].contiguous(), table[:, 1].contiguous(), table[:, 2].contiguous()


def check_lora_shapes(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """The shape contract every add_lora implementation asserts."""
    num_tokens, in_features = x.shape
    num_slots, max_rank, a_in = lora_a.shape
    assert a_in == in_features, f"lora_a in_features {a_in} != x's {in_features}"
    assert lora_b.shape[0] == num_slots and lora_b.shape[2] == max_rank, (
        f"lora_b {tuple(lora_b.shape)} does not match lora_a {tuple(lora_a.shape)}"
    )
    assert y.shape == (num_tokens, lora_b.shape[1]), (
        f"y {tuple(y.shape)} != ({num_tokens}, {lora_b.shape[1]})"
    )


def add_lora_torch(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, mapping: LoRAMapping
) -> None:
    """y[t] += (x[t] @ lora_a[s].T) @ lora_b[s].T in place, s = mapping.token_slots[t] >= 0.

    y: (num_tokens, out_features), x: (num_tokens, in_features); layout of lora_a/lora_b in the module
    docstring. Rows are grouped by slot: per distinct slot present (at most num_slots), two matmuls on
    views when its tokens are contiguous, else a gather, two matmuls and a scatter-add; plain matmuls
    when every token shares one slot.
    """
    check_lora_shapes(y, x, lora_a, lora_b)
    if mapping.is_empty:
        return
    slot = mapping.single_slot
    if slot is not None:
        y.addmm_(x @ lora_a[slot].T, lora_b[slot].T)  # (T, r) @ (r, out)
        return
    for slot, rows in mapping.groups:
        if isinstance(rows, slice):  # contiguous rows: views, no gather nor scatter
            y[rows].addmm_(x[rows] @ lora_a[slot].T, lora_b[slot].T)  # (n, r) @ (r, out)
        else:
            shrunk = x.index_select(0, rows) @ lora_a[slot].T  # (n, r)
            y.index_add_(0, rows, shrunk @ lora_b[slot].T)  # (n, out)


def add_lora_embedding_torch(
    y: torch.Tensor, indices: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, mapping: LoRAMapping
) -> None:
    """y[t] += lora_a[s][:, indices[t]] @ lora_b[s].T in place, s = mapping.token_slots[t] >= 0: the delta of
    an adapted embedding (PEFT's lora.Embedding), row indices[t] of it for token t.

    y: (num_tokens, dim), indices: (num_tokens,) int64 (token ids for `wte`, positions for `wpe`);
    lora_a: (num_slots, max_rank, num_embeddings), lora_b: (num_slots, dim, max_rank), the layout of the
    projections with the one-hot row as input. A gather replaces the first matmul; any device.
    """
    assert indices.shape == (y.shape[0],), f"indices {tuple(indices.shape)} != ({y.shape[0]},)"
    assert lora_b.shape[:1] == lora_a.shape[:1] and lora_b.shape[1:] == (y.shape[1], lora_a.shape[1]), (
        f"lora_a {tuple(lora_a.shape)} / lora_b {tuple(lora_b.shape)} do not fit y {tuple(y.shape)}"
    )
    for slot, rows in mapping.groups:
        shrunk = lora_a[slot].index_select(1, indices[rows]).T  # (n, r)
        if isinstance(rows, slice):
            y[rows].addmm_(shrunk, lora_b[slot].T)  # (n, r) @ (r, dim)
        else:
            y.index_add_(0, rows, shrunk @ lora_b[slot].T)
