"""Which adapter sits in which device slot: LRU placement and the pins of requests in flight (no torch)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class LoRASlotsFullError(RuntimeError):
    """The adapters asked for do not fit: more distinct names than slots, or the others are pinned.
    The scheduler avoids it by asking `can_assign` before it admits a request."""


class LoRASlotTable:
    """num_slots device slots, each empty or holding one adapter name.

    Invariants: a name holds at most one slot and a slot at most one name; the resident names are kept
    least recently used first; a pinned name (pin count > 0: requests in flight use it) is never evicted.
    A failed `assign` changes nothing.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free_slots = list(range(num_slots))  # kept sorted: the lowest free slot is taken first
        self._pins: dict[str, int] = {}

    def slot_of(self, name: str) -> int | None:
        return self._resident.get(name)

    def lru_order(self) -> list[str]:
        """Resident names, least recently used first (the next to be evicted first among unpinned)."""
        return list(self._resident)

    def pin_count(self, name: str) -> int:
        return self._pins.get(name, 0)

    def pin(self, name: str) -> None:
        self._pins[name] = self._pins.get(name, 0) + 1

    def unpin(self, name: str) -> int:
        """Returns the pins left."""
        count = self._pins.get(name, 0)
        if count == 0:
            raise ValueError(f"adapter {name!r} is not pinned")
        if count == 1:
            del self._pins[name]
        else:
            self._pins[name] = count - 1
        return count - 1

    def _plan(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """(names to place, residents to evict for them), or LoRASlotsFullError."""
        wanted = list(dict.fromkeys(names))
        missing = [name for name in wanted if name not in self._resident]
        needed = len(missing) - len(self._free_slots)
        if needed <= 0:
            return missing, []
        keep = set(wanted)
        evictable = [name for name in self._resident if name not in keep and self.pin_count(name) == 0]
        if len(evictable) < needed:
            raise LoRASlotsFullError(
                f"{len(wanted)} adapters asked for, {self.num_slots} slots, "
                f"{len(self._resident) - len(evictable)} of them held by pinned or co-requested adapters"
            )
        return missing, evictable[:needed]

    def can_assign(self, names: Iterable[str]) -> bool:
        try:
            self._plan(names)
        except LoRASlotsFullError:
            return False
        return True

    def assign(self, names: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, int]]]:
        """Slots for `names` (duplicates allowed): residents become most recently used, the others take
        the lowest free slot, then the slot of the least recently used unpinned resident not asked for.
        Returns (slot by name, [(name, slot) whose weights the caller must now copy in])."""
        names = list(names)
        missing, evicted = self._plan(names)
        for name in evicted:
            self.release(name)
        loads = []
        for name in missing:
            slot = self._free_slots.pop(0)
            self._resident[name] = slot
            loads.append((name, slot))
        for name in dict.fromkeys(names):
            self._resident.move_to_end(name)
        return {name: self._resident[name] for name in names}, loads

    def release(self, name: str) -> int | None:
        """Frees the name's slot (eviction, or the adapter removed); returns it, None if not resident."""
        slot = self._resident.pop(name, None)
        if slot is not None:
            self._free_slots.append(slot)
            self._free_slots.sort()
        return slot
