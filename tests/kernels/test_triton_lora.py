"""lmservice/kernels/triton_lora.py against the torch path (lmservice/kernels/lora.py), under TRITON_INTERPRET=1 on CPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # NOTE: must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from lmservice.kernels.lora import LoRAMapping, add_lora_torch  # noqa: E402
from lmservice.kernels.triton_lora import add_lora_triton, bgmv_add_lora, sgmv_add_lora  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# in_features and out_features cross the kernels' K and N blocks (64); segments cross BLOCK_M (16)
IN_FEATURES, OUT_FEATURES = 80, 72
NUM_SLOTS = 4

# (seq_slots, query_lens): one segment per sequence, slot -1 = base model
BATCHES = {
    "prefill": ([0, 2, -1, 1, 2], [5, 20, 3, 17, 1]),
    "decode": ([1, -1, 0, 2, 2, 1, 0], [1] * 7),
    "mixed": ([2, 0, -1, 1, 1], [18, 1, 1, 1, 4]),
    "one_slot": ([1, 1], [9, 1]),
}
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2},
}


def make_stacks(ranks, dtype, seed=0):
    """Stacks of len(ranks) adapters zero-padded to max(ranks), plus one unused slot full of NaN:
    a kernel that reads a slot no token names, or padding past an adapter's rank, poisons the output."""
    gen = torch.Generator().manual_seed(seed)
    max_rank = max(ranks)
    lora_a = torch.full((NUM_SLOTS, max_rank, IN_FEATURES), float("nan"))  # (S, R, in)
    lora_b = torch.full((NUM_SLOTS, OUT_FEATURES, max_rank), float("nan"))  # (S, out, R)
    for s, r in enumerate(ranks):
        lora_a[s] = 0.0
        lora_b[s] = 0.0
        lora_a[s, :r] = torch.randn(r, IN_FEATURES, generator=gen) / IN_FEATURES**0.5
        lora_b[s, :, :r] = torch.randn(OUT_FEATURES, r, generator=gen) / r**0.5
    return lora_a.to(DEVICE, dtype), lora_b.to(DEVICE, dtype)


def make_batch(seq_slots, query_lens, dtype, seed=1):
    """x, y with NaN in the rows of tokens without adapter: untouched rows must stay NaN, and their x
    must not leak into other rows. y is a column slice of a wider tensor, as a fused projection's is."""
    gen = torch.Generator().manual_seed(seed)
    mapping = LoRAMapping.from_seq_slots(seq_slots, query_lens, DEVICE)
    num_tokens = sum(query_lens)
    base_rows = (mapping.token_slots < 0).cpu()
    x = torch.randn(num_tokens, IN_FEATURES, generator=gen)
    x[base_rows] = float("nan")
    wide = torch.randn(num_tokens, OUT_FEATURES + 8, generator=gen)
    wide[base_rows] = float("nan")
    return mapping, x.to(DEVICE, dtype), wide.to(DEVICE, dtype)[:, 4 : 4 + OUT_FEATURES]


def run_kernel(kernel, y, x, lora_a, lora_b, mapping):
    if kernel == "bgmv":
        bgmv_add_lora(y, x, lora_a, lora_b, mapping.token_slots)
    elif kernel == "sgmv":
        sgmv_add_lora(y, x, lora_a, lora_b, mapping)
    else:
        add_lora_triton(y, x, lora_a, lora_b, mapping)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("kernel", ["bgmv", "sgmv", "dispatch"])
def test_triton_matches_torch(kernel, batch, dtype):
    uses_dot = kernel == "sgmv" or (
        kernel == "dispatch" and batch != "decode"
    )  # SGMV; decode dispatches to BGMV
    if dtype == torch.bfloat16 and uses_dot and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter computes tl.dot on bf16 wrongly (raw bits); run on CUDA")
    seq_slots, query_lens = BATCHES[batch]
    lora_a, lora_b = make_stacks([8, 2, 5], dtype)
    mapping, x, y = make_batch(seq_slots, query_lens, dtype)
    expected = y.clone()
    add_lora_torch(expected, x, lora_a[:3], lora_b[:3], mapping)  # the reference never sees the NaN slot
    before = y.clone()

    run_kernel(kernel, y, x, lora_a, lora_b, mapping)

    torch.testing.assert_close(y, expected, equal_nan=True, **TOLERANCES[dtype])
    assert not torch.equal(y.nan_to_num(), before.nan_to_num()), "the kernel added nothing"


@pytest.mark.parametrize("kernel", ["bgmv", "sgmv"])
def test_rank_above_sixteen_pads_to_next_power_of_two(kernel):
    lora_a, lora_b = make_stacks([20, 3], torch.float32)
    mapping, x, y = make_batch([1, 0, -1], [17, 2, 1], torch.float32)
    expected = y.clone()
    add_lora_torch(expected, x, lora_a[:2], lora_b[:2], mapping)
    run_kernel(kernel, y, x, lora_a, lora_b, mapping)
    torch.testing.assert_close(y, expected, equal_nan=True, **TOLERANCES[torch.float32])


def test_batch_without_adapters_is_a_no_op():
    lora_a, lora_b = make_stacks([4], torch.float32)
    mapping, x, y = make_batch([-1, -1], [3, 1], torch.float32)
    before = y.clone()
    add_lora_triton(y, x, lora_a, lora_b, mapping)
    assert torch.equal(y.isnan(), before.isnan())


def test_dtype_mismatch_is_refused():
    lora_a, lora_b = make_stacks([4], torch.float32)
    mapping, x, y = make_batch([0], [2], torch.float16)
    with pytest.raises(AssertionError, match="dtypes differ"):
        add_lora_triton(y, x, lora_a, lora_b, mapping)
