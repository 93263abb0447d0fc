"""lmservice/kernels/lora.py: the grouped torch path against a naive per-row loop over unpadded adapters."""

from __future__ import annotations

import pytest
import torch

from lmservice.kernels.lora import LoRAMapping, add_lora_torch

IN_FEATURES, OUT_FEATURES = 24, 40
RANKS = (2, 8, 5)  # one adapter per slot, different ranks, padded into one stack


def make_adapters(ranks=RANKS, dtype=torch.float64, seed=0):
    """Unpadded (A (r, in), B (out, r)) per adapter, and the padded stacks the kernels take."""
    gen = torch.Generator().manual_seed(seed)
    adapters = [
        (
            torch.randn(r, IN_FEATURES, generator=gen, dtype=dtype),
            torch.randn(OUT_FEATURES, r, generator=gen, dtype=dtype),
        )
        for r in ranks
    ]
    max_rank = max(ranks)
    lora_a = torch.zeros(len(ranks), max_rank, IN_FEATURES, dtype=dtype)  # (S, R, in)
    lora_b = torch.zeros(len(ranks), OUT_FEATURES, max_rank, dtype=dtype)  # (S, out, R)
    for s, (a, b) in enumerate(adapters):
        lora_a[s, : a.shape[0]] = a
        lora_b[s, :, : b.shape[1]] = b
    return adapters, lora_a, lora_b


def naive_add_lora(y, x, adapters, token_slots):
    """Obviously correct: one row at a time, with the adapter's own unpadded matrices."""
    out = y.clone()
    for t, s in enumerate(token_slots):
        if s >= 0:
            a, b = adapters[s]
            out[t] += b @ (a @ x[t])
    return out


CASES = {
    "mixed": [0, 0, 1, 2, 2, 2, 1, 0],
    "with_no_adapter_rows": [-1, 1, 1, -1, -1, 2, 0, -1],
    "all_one_slot": [1] * 7,
    "no_adapter_at_all": [-1] * 5,
    "decode_rows": [2, 0, 1, 1, 0, 2],
    "ordered_by_slot": [0, 0, 1, 1, 1, 2, -1, -1],
    "single_token": [2],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_add_lora_torch_matches_naive_reference(name):
    token_slots = CASES[name]
    adapters, lora_a, lora_b = make_adapters()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(token_slots), IN_FEATURES, generator=gen, dtype=torch.float64)
    y = torch.randn(len(token_slots), OUT_FEATURES, generator=gen, dtype=torch.float64)
    expected = naive_add_lora(y, x, adapters, token_slots)

    add_lora_torch(y, x, lora_a, lora_b, LoRAMapping.from_token_slots(token_slots, "cpu"))

    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_rows_without_adapter_are_untouched_bit_for_bit():
    token_slots = [0, -1, 1, -1]
    _, lora_a, lora_b = make_adapters(dtype=torch.float32)
    x = torch.randn(4, IN_FEATURES)
    y = torch.randn(4, OUT_FEATURES)
    before = y.clone()
    add_lora_torch(y, x, lora_a, lora_b, LoRAMapping.from_token_slots(token_slots, "cpu"))
    assert torch.equal(y[[1, 3]], before[[1, 3]])
    assert not torch.equal(y[[0, 2]], before[[0, 2]])


def test_fp32_matches_fp64_reference():
    token_slots = [0, 1, 1, 2, -1, 0]
    adapters, lora_a, lora_b = make_adapters()
    x = torch.randn(len(token_slots), IN_FEATURES, dtype=torch.float64)
    y = torch.randn(len(token_slots), OUT_FEATURES, dtype=torch.float64)
    expected = naive_add_lora(y, x, adapters, token_slots)
    y32 = y.float()
    add_lora_torch(
        y32, x.float(), lora_a.float(), lora_b.float(), LoRAMapping.from_token_slots(token_slots, "cpu")
    )
    torch.testing.assert_close(y32, expected.float(), rtol=1e-5, atol=1e-4)


def test_from_seq_slots_agrees_with_from_token_slots():
    by_seq = LoRAMapping.from_seq_slots([1, -1, 1, 0, 0], [3, 2, 1, 1, 4], "cpu")
    by_token = LoRAMapping.from_token_slots([1, 1, 1, -1, -1, 1, 0, 0, 0, 0, 0], "cpu")
    assert torch.equal(by_seq.token_slots, by_token.token_slots)
    # the same slot in two separate places of the batch forms one group (indices); contiguous: a slice
    assert by_seq.groups[0] == (0, slice(6, 11))
    assert by_seq.groups[1][0] == 1 and by_seq.groups[1][1].tolist() == [0, 1, 2, 5]
    assert by_token.groups[0] == by_seq.groups[0]
    assert torch.equal(by_token.groups[1][1], by_seq.groups[1][1])
    assert by_seq.segments == ((0, 3, 1), (5, 1, 1), (6, 1, 0), (7, 4, 0))
    assert by_token.segments == ((0, 3, 1), (5, 1, 1), (6, 5, 0))
    assert by_seq.max_seg_len == 4 and by_token.max_seg_len == 5


def test_single_slot_only_when_every_token_has_it():
    assert LoRAMapping.from_token_slots([3, 3, 3], "cpu").single_slot == 3
    assert LoRAMapping.from_token_slots([3, -1, 3], "cpu").single_slot is None
    assert LoRAMapping.from_token_slots([3, 2], "cpu").single_slot is None
    assert LoRAMapping.from_token_slots([-1, -1], "cpu").is_empty


def test_shape_mismatch_is_refused():
    _, lora_a, lora_b = make_adapters(dtype=torch.float32)
    mapping = LoRAMapping.from_token_slots([0, 1], "cpu")
    with pytest.raises(AssertionError, match="in_features"):
        add_lora_torch(torch.zeros(2, OUT_FEATURES), torch.zeros(2, IN_FEATURES + 1), lora_a, lora_b, mapping)
    with pytest.raises(AssertionError, match="y"):
        add_lora_torch(torch.zeros(2, OUT_FEATURES + 1), torch.zeros(2, IN_FEATURES), lora_a, lora_b, mapping)
