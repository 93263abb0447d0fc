"""lmservice/model/lora_store.py: slot contents after loads, evictions and rank growth; pins and removal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmservice.kernels.lora import LoRAMapping, add_lora_torch
from lmservice.model.lora import LoRAAdapter, LoRATargets
from lmservice.model.lora_slots import LoRASlotsFullError
from lmservice.model.lora_store import LoRAStore

TARGETS = LoRATargets(n_layer=2, n_embd=8, n_inner=16)


def make_adapter(name, rank, keys, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = TARGETS.shapes()
    weights = {
        key: (
            torch.randn(rank, shapes[key][0], generator=gen),
            torch.randn(shapes[key][1], rank, generator=gen),
        )
        for key in keys
    }
    return LoRAAdapter(name, Path(name), weights)


def assert_slot_holds(store, slot, adapter):
    """Slot `slot` of every buffer is the adapter's weights, zero-padded, and zero where it targets nothing."""
    for key in TARGETS.shapes():
        stacks = store.lora_weights(key)
        if stacks is None:
            assert key not in adapter.weights
            continue
        lora_a, lora_b = stacks
        expected_a, expected_b = torch.zeros_like(lora_a[slot]), torch.zeros_like(lora_b[slot])
        if key in adapter.weights:
            a, b = adapter.weights[key]
            expected_a[: a.shape[0]] = a
            expected_b[:, : b.shape[1]] = b
        assert torch.equal(lora_a[slot], expected_a), key
        assert torch.equal(lora_b[slot], expected_b), key


def test_acquire_copies_adapters_into_slots_and_none_is_no_slot():
    store = LoRAStore(TARGETS, max_loras=2, max_lora_rank=8)
    qkv = make_adapter("qkv", 2, ["h.0.attn.c_attn", "h.1.attn.c_attn"], seed=1)
    mlp = make_adapter("mlp", 4, ["h.1.mlp.c_fc", "h.1.mlp.c_proj"], seed=2)
    store.add(qkv)
    store.add(mlp)
    assert store.rank == 4
    assert store.lora_weights("h.0.attn.c_proj") is None  # nobody targets it: the model skips it
    assert store.lora_weights("h.1.mlp.c_proj")[1].shape == (2, 8, 4)  # (max_loras, out, rank)
    assert store.acquire(["mlp", None, "qkv", "mlp"]) == [0, -1, 1, 0]
    assert_slot_holds(store, 0, mlp)
    assert_slot_holds(store, 1, qkv)


def test_eviction_overwrites_every_module_of_the_slot():
    store = LoRAStore(TARGETS, max_loras=1, max_lora_rank=8)
    qkv = make_adapter("qkv", 4, ["h.0.attn.c_attn"], seed=1)
    mlp = make_adapter("mlp", 2, ["h.0.mlp.c_fc"], seed=2)
    store.add(qkv)
    store.add(mlp)
    assert store.acquire(["qkv"]) == [0]
    assert store.acquire(["mlp"]) == [0]
    assert_slot_holds(store, 0, mlp)  # qkv's c_attn rows are zero again, its padding too
    assert store.resident_names() == ["mlp"]


def test_rank_growth_keeps_resident_adapters():
    store = LoRAStore(TARGETS, max_loras=2, max_lora_rank=8)
    small = make_adapter("small", 2, ["h.0.attn.c_attn"], seed=1)
    store.add(small)
    store.acquire(["small"])
    big = make_adapter("big", 6, ["h.0.attn.c_attn", "h.0.mlp.c_proj"], seed=2)
    store.add(big)
    assert store.rank == 6 and store.lora_weights("h.0.attn.c_attn")[0].shape == (2, 6, 8)
    assert_slot_holds(store, 0, small)
    store.acquire(["big"])
    assert_slot_holds(store, 1, big)


def test_store_dtype_and_device():
    store = LoRAStore(TARGETS, max_loras=2, max_lora_rank=8, dtype=torch.float16)
    store.add(make_adapter("a", 2, ["h.0.attn.c_attn"]))
    store.acquire(["a"])
    assert store.lora_weights("h.0.attn.c_attn")[0].dtype == torch.float16


def test_pinned_adapter_survives_removal_until_its_last_unpin():
    store = LoRAStore(TARGETS, max_loras=2, max_lora_rank=8)
    store.add(make_adapter("a", 2, ["h.0.attn.c_attn"]))
    store.pin("a")
    store.pin("a")
    store.acquire(["a"])
    assert store.remove("a") is False
    assert "a" not in store and store.names() == []  # new requests cannot name it
    with pytest.raises(KeyError):
        store.pin("a")
    with pytest.raises(ValueError, match="being removed"):
        store.add(make_adapter("a", 2, ["h.0.attn.c_attn"]))
    assert store.acquire(["a"]) == [0]  # the requests in flight keep their slot
    store.unpin("a")
    assert store.resident_names() == ["a"]
    store.unpin("a")
    assert store.resident_names() == [] and "a" not in store
    assert not store.lora_weights("h.0.attn.c_attn")[0].any()  # the freed slot is zero
    store.add(make_adapter("a", 2, ["h.0.attn.c_attn"]))  # the name is free again


def test_unpinned_removal_is_immediate():
    store = LoRAStore(TARGETS, max_loras=2, max_lora_rank=8)
    store.add(make_adapter("a", 2, ["h.0.attn.c_attn"]))
    store.acquire(["a"])
    assert store.remove("a") is True
    assert store.names() == [] and store.resident_names() == []
    with pytest.raises(KeyError):
        store.remove("a")


def test_acquire_refusals_change_nothing():
    store = LoRAStore(TARGETS, max_loras=1, max_lora_rank=8)
    store.add(make_adapter("a", 2, ["h.0.attn.c_attn"], seed=1))
    store.add(make_adapter("b", 2, ["h.0.attn.c_attn"], seed=2))
    with pytest.raises(KeyError):
        store.acquire(["a", "nope"])
    store.acquire(["a"])
    store.pin("a")
    assert not store.can_acquire(["b"]) and store.can_acquire(["a", None])
    with pytest.raises(LoRASlotsFullError):
        store.acquire(["b"])
    assert_slot_holds(store, 0, store.get("a"))


def test_adapters_that_do_not_fit_the_base_are_refused():
    store = LoRAStore(TARGETS, max_loras=1, max_lora_rank=4)
    with pytest.raises(ValueError, match="max_lora_rank"):
        store.add(make_adapter("wide", 8, ["h.0.attn.c_attn"]))
    other = LoRATargets(n_layer=2, n_embd=16, n_inner=64)
    alien = LoRAAdapter("alien", Path("alien"), {"h.0.attn.c_attn": (torch.zeros(2, 16), torch.zeros(48, 2))})
    assert other.shapes()["h.0.attn.c_attn"] == (16, 48)
    with pytest.raises(ValueError, match="does not fit"):
        store.add(alien)
    store.add(make_adapter("a", 2, ["h.0.attn.c_attn"]))
    with pytest.raises(ValueError, match="already registered"):
        store.add(make_adapter("a", 2, ["h.0.attn.c_attn"]))
    assert store.names() == ["a"]


def test_step_hook_adds_deltas_only_where_adapters_target():
    store = LoRAStore(TARGETS, max_loras=2, max_lora_rank=8)
    adapter = make_adapter("a", 2, ["h.0.attn.c_attn"], seed=1)
    store.add(adapter)
    slots = store.acquire(["a", None])
    assert store.step_hook(LoRAMapping.from_seq_slots([-1], [3], "cpu"), add_lora_torch) is None
    hook = store.step_hook(LoRAMapping.from_seq_slots(slots, [2, 1], "cpu"), add_lora_torch)
    x = torch.randn(3, 8)
    y = torch.zeros(3, 24)
    hook.apply("h.0.attn.c_attn", x, y)
    a, b = adapter.weights["h.0.attn.c_attn"]
    torch.testing.assert_close(y[:2], x[:2] @ a.T @ b.T)
    assert not y[2].any()
    untouched = torch.zeros(3, 8)
    hook.apply("h.0.attn.c_proj", x, untouched)
    assert not untouched.any()
