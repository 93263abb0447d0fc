"""lmservice/engine/adapters.py: one owner of load ids, pins, residency and score heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmservice.engine.adapters import AdapterTable
from lmservice.model.lora import LoRAAdapter, LoRATargets

TARGETS = LoRATargets(n_layer=1, n_embd=8, n_inner=16)
BASE_HEAD = (torch.ones(2, 8), None)


def adapter(name: str, num_labels: int | None = None) -> LoRAAdapter:
    in_features, out_features = TARGETS.shapes()["h.0.attn.c_attn"]
    weights = {"h.0.attn.c_attn": (torch.randn(2, in_features), torch.randn(out_features, 2))}
    score = torch.randn(num_labels, 8) if num_labels else None
    return LoRAAdapter(name, Path(name), weights, score_weight=score)


def table(max_loras: int = 2) -> AdapterTable:
    return AdapterTable(TARGETS, max_loras, 8, torch.device("cpu"), torch.float32, base_score_head=BASE_HEAD)


def test_score_heads_by_load_and_the_base_head():
    adapters = table()
    adapters.add(adapter("cls", num_labels=3))
    adapters.add(adapter("gen"))
    key = adapters.pin("cls")
    assert adapters.score_head(None) is BASE_HEAD
    assert adapters.score_head(key)[0].shape == (3, 8)
    assert adapters.score_head(adapters.pin("gen")) is None  # a generation adapter has no head
    assert adapters.score_head(("cls", key[1] + 100)) is None  # another load of the name: not this head


def test_a_removed_adapter_stays_for_the_requests_pinned_to_it_then_goes():
    adapters = table()
    adapters.add(adapter("cls", num_labels=3))
    key = adapters.pin("cls")
    adapters.remove("cls")
    assert "cls" not in adapters  # new requests cannot name it
    with pytest.raises(KeyError):
        adapters.pin("cls")
    with pytest.raises(ValueError, match="being removed"):  # nor can a new load take its name yet
        adapters.add(adapter("cls"))
    assert adapters.score_head(key) is not None  # the request in flight still classifies
    adapters.release(key)
    assert adapters.score_head(key) is None
    adapters.add(adapter("cls", num_labels=2))  # the name is free again: a new load, a new key
    new_key = adapters.pin("cls")
    assert new_key != key and adapters.score_head(new_key)[0].shape == (2, 8)


def test_removing_an_idle_adapter_frees_it_at_once():
    adapters = table()
    adapters.add(adapter("a"))
    adapters.release(adapters.pin("a"))
    adapters.remove("a")
    assert "a" not in adapters
    adapters.add(adapter("a"))  # no request held it: the name is free now
    with pytest.raises(KeyError):
        adapters.remove("unknown")


def test_step_hook_places_adapters_in_slots_least_recently_used_out():
    adapters = table(max_loras=1)
    for name in ("a", "b"):
        adapters.add(adapter(name))
    assert adapters.step_hook([None, None], [3, 1], add_lora=None) is None  # no row uses an adapter
    assert adapters.step_hook(["a", None], [3, 1], add_lora=None) is not None
    assert adapters.resident_names() == ["a"]
    assert adapters.can_acquire(["b"]) and not adapters.can_acquire(["a", "b"])  # one slot
    key = adapters.pin("a")
    assert not adapters.can_acquire(["b"])  # "a" is pinned by a request in flight: not evicted
    adapters.release(key)
    adapters.step_hook(["b"], [2], add_lora=None)
    assert adapters.resident_names() == ["b"]
