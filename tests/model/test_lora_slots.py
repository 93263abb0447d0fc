"""lmservice/model/lora_slots.py: exact slot ids, LRU eviction order and pins (no torch, no model)."""

from __future__ import annotations

import pytest

from lmservice.model.lora_slots import LoRASlotsFullError, LoRASlotTable


def test_lowest_free_slot_first_then_lru_eviction():
    table = LoRASlotTable(2)
    assert table.assign(["a"]) == ({"a": 0}, [("a", 0)])
    assert table.assign(["b"]) == ({"b": 1}, [("b", 1)])
    assert table.assign(["a"]) == ({"a": 0}, [])  # resident: no copy, becomes most recently used
    assert table.lru_order() == ["b", "a"]
    assert table.assign(["c"]) == ({"c": 1}, [("c", 1)])  # b was least recently used
    assert table.slot_of("b") is None and table.lru_order() == ["a", "c"]
    assert table.assign(["b"]) == ({"b": 0}, [("b", 0)])  # now a was
    assert table.lru_order() == ["c", "b"]


def test_one_assign_never_evicts_its_own_names_and_allows_duplicates():
    table = LoRASlotTable(2)
    table.assign(["a", "b"])
    slots, loads = table.assign(["b", "c", "b"])
    assert slots == {"b": 1, "c": 0} and loads == [("c", 0)]
    assert table.lru_order() == ["b", "c"]


def test_pinned_adapters_are_not_evicted():
    table = LoRASlotTable(2)
    table.assign(["a"])
    table.assign(["b"])
    table.pin("a")  # least recently used, but a request in flight uses it
    assert table.assign(["c"]) == ({"c": 1}, [("c", 1)])
    assert table.slot_of("a") == 0
    table.pin("c")
    assert not table.can_assign(["d"])
    with pytest.raises(LoRASlotsFullError):
        table.assign(["d"])
    assert table.lru_order() == ["a", "c"]  # a failed assign changes nothing
    assert table.unpin("a") == 0
    assert table.can_assign(["d"])
    assert table.assign(["d"]) == ({"d": 0}, [("d", 0)])


def test_pins_are_reference_counts():
    table = LoRASlotTable(1)
    table.assign(["a"])
    table.pin("a")
    table.pin("a")
    assert table.unpin("a") == 1
    assert not table.can_assign(["b"])
    assert table.unpin("a") == 0
    assert table.can_assign(["b"])
    with pytest.raises(ValueError, match="not pinned"):
        table.unpin("a")


def test_more_distinct_names_than_slots_do_not_fit():
    table = LoRASlotTable(2)
    assert not table.can_assign(["a", "b", "c"])
    with pytest.raises(LoRASlotsFullError):
        table.assign(["a", "b", "c"])
    assert table.lru_order() == []


def test_release_frees_the_slot_for_the_next_name():
    table = LoRASlotTable(3)
    table.assign(["a", "b", "c"])
    assert table.release("b") == 1
    assert table.release("b") is None
    assert table.assign(["d"]) == ({"d": 1}, [("d", 1)])
