"""The KV-cache formats (lmservice/kernels/kv_cache.py: fp16, bf16, int8 with a scale per token and head): the
torch reference's write and read, then every kernel that reads or writes a narrow cache against it: the torch
attention, the C attention and write (cpu_native.py; tests/kernels/test_cpu_isa.py re-runs this file on the AVX2
and portable builds), and the Triton kernels under the interpreter. Caches are NaN outside the written contexts."""

from __future__ import annotations

import pytest
import torch

import lmservice.kernels.cpu_native as native
from lmservice.kernels.attention import decode_attention_torch, prefill_attention_torch
from lmservice.kernels.kv_cache import quantize_kv_int8, widen_kv, write_kv_cache_torch
from tests.kernels.paged_batch import make_paged_batch, qkv_views
from tests.kernels.test_attention import SCALE, decode_by_loop

LIB = native.native_library()
NEEDS_C = pytest.mark.skipif(LIB is None, reason="no native kernels built for this CPU (no C compiler at install time)")
NARROW = [torch.float16, torch.bfloat16, torch.int8]
IDS = ["fp16", "bf16", "int8"]
# attention over a narrow cache against fp32 attention over the unrounded values: the storage error alone
STORAGE_TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.int8: 3e-2}


def narrow(cache: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An fp32 cache (NaN outside its contexts) stored in `dtype` by the reference: (values, int8 scales or None);
    NaN rows stay poisoned (NaN, or a NaN scale)."""
    if dtype != torch.int8:
        return cache.to(dtype), None
    return quantize_kv_int8(cache)


def narrow_batch(block_size: int, seq_lens: list[int], q_lens: list[int], dtype: torch.dtype, gen, num_heads: int = 3,
                 head_dim: int = 64):
    b = make_paged_batch(seq_lens, q_lens, block_size, num_heads, torch.float32, gen, head_dim=head_dim)
    (k, ks), (v, vs) = narrow(b.k_cache, dtype), narrow(b.v_cache, dtype)
    return b, k, v, ks, vs


# ---- the reference


def test_int8_quantization_rounds_each_head_to_its_own_scale(gen):
    x = torch.randn(50, 4, 64, generator=gen) * torch.logspace(-3, 3, 50)[:, None, None]
    x[3, 1] = 0.0
    q, scales = quantize_kv_int8(x)
    assert q.dtype == torch.int8 and scales.shape == (50, 4) and scales.dtype == torch.float32
    assert q.abs().max() == 127 and scales[3, 1] == 0 and torch.equal(q[3, 1], torch.zeros(64, dtype=torch.int8))
    torch.testing.assert_close(scales, x.abs().amax(-1) / 127, atol=0, rtol=1e-6)
    assert ((widen_kv(q, scales) - x).abs() <= scales[..., None] / 2 * (1 + 1e-5)).all()  # half a step at most
    ties = torch.tensor([[[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]]])  # scale 1: ties go to even
    assert quantize_kv_int8(ties)[0].flatten().tolist() == [127, 0, 2, 2, 0, -2]


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_int8_a_non_finite_head_gets_a_nan_scale_alone(poison, gen):
    x = torch.randn(3, 4, 64, generator=gen)
    clean_q, clean_s = quantize_kv_int8(x)
    x[1, 2, 7] = poison
    q, scales = quantize_kv_int8(x)
    assert scales[1, 2].isnan() and torch.equal(q[1, 2], torch.zeros(64, dtype=torch.int8))
    assert widen_kv(q, scales)[1, 2].isnan().all()
    keep = torch.ones(3, 4, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.equal(q[keep], clean_q[keep]) and torch.equal(scales[keep], clean_s[keep])


@pytest.mark.parametrize("dtype", [torch.float32, *NARROW], ids=["fp32", *IDS])
def test_write_then_widen_round_trips_and_skips_padding(dtype, gen):
    num_blocks, block_size, num_heads = 4, 16, 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:20]
    slots[[0, 9]] = -1
    _, key, value = qkv_views(20, num_heads, 64, torch.float32, gen)
    k_cache = torch.full((num_blocks, block_size, num_heads, 64), float("nan")).to(dtype)
    v_cache = k_cache.clone()
    scales = [torch.full((num_blocks, block_size, num_heads), float("nan")) for _ in range(2)] \
        if dtype == torch.int8 else [None, None]
    write_kv_cache_torch(key, value, k_cache, v_cache, slots, *scales)
    written = slots[slots >= 0]
    for x, cache, s in ((key, k_cache, scales[0]), (value, v_cache, scales[1])):
        flat = cache.view(-1, num_heads, 64)
        wide = widen_kv(flat, None if s is None else s.view(-1, num_heads))
        want = x[slots >= 0]
        if dtype == torch.int8:
            assert ((wide[written] - want).abs() <= s.view(-1, num_heads)[written][..., None] / 2 * (1 + 1e-5)).all()
        else:
            assert torch.equal(wide[written], want.to(dtype).float())  # round to nearest even, as .to() does
        untouched = torch.ones(flat.shape[0], dtype=torch.bool)
        untouched[written] = False
        assert wide[untouched].isnan().all()


@pytest.mark.parametrize("dtype", NARROW, ids=IDS)
@pytest.mark.parametrize("block_size", [1, 16])
def test_torch_attention_reads_a_narrow_cache_as_its_widened_values(dtype, block_size, gen):
    """Decode and (chunked) prefill over a narrow cache equal fp32 attention over the widened cache, and stay within
    the storage error of fp32 attention over the values before they were stored."""
    seq_lens, q_lens = [1, block_size + 1, 3 * block_size + 5, 40], [1, 1, 4, 40]
    b, k, v, ks, vs = narrow_batch(block_size, seq_lens, q_lens, dtype, gen)
    wide_k, wide_v = widen_kv(k, ks), widen_kv(v, vs)
    args = (b.cu_seqlens_q, b.seq_lens, b.block_tables, SCALE)
    got = prefill_attention_torch(b.q, k, v, *args, ks, vs)
    torch.testing.assert_close(got, prefill_attention_torch(b.q, wide_k, wide_v, *args), atol=1e-5, rtol=1e-5)
    tol = STORAGE_TOL[dtype]
    torch.testing.assert_close(got, prefill_attention_torch(b.q, b.k_cache, b.v_cache, *args), atol=tol, rtol=tol)
    last = (b.cu_seqlens_q[1:] - 1).long()  # each sequence's last query, as a decode
    decoded = decode_attention_torch(b.q[last], k, v, b.seq_lens, b.block_tables, SCALE, None, ks, vs)
    assert torch.isfinite(decoded).all()
    torch.testing.assert_close(decoded, decode_by_loop(b.q[last], wide_k, wide_v, b.seq_lens, b.block_tables),
                               atol=1e-5, rtol=1e-5)


# ---- C


@NEEDS_C
@pytest.mark.parametrize("dtype", NARROW, ids=IDS)
@pytest.mark.parametrize(("block_size", "head_dim"), [(1, 64), (16, 64), (16, 18)])
def test_c_decode_attention_reads_a_narrow_cache_as_its_widened_values(dtype, block_size, head_dim, gen):
    """head_dim 18: a tail past the vector width; sequences ending mid-block, at a block's end and past it."""
    seq_lens = [1, block_size, block_size + 1, 3 * block_size + 5, 2]
    b, k, v, ks, vs = narrow_batch(block_size, seq_lens, [1] * len(seq_lens), dtype, gen, head_dim=head_dim)
    got = LIB.decode_attention(b.q, k, v, b.seq_lens, b.block_tables, SCALE, None, ks, vs)
    assert torch.isfinite(got).all()
    want = decode_by_loop(b.q, widen_kv(k, ks), widen_kv(v, vs), b.seq_lens, b.block_tables)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", NARROW, ids=IDS)
@pytest.mark.parametrize("kernel", ["torch", pytest.param("c", marks=NEEDS_C), "triton"])
def test_a_nan_in_one_sequences_context_fails_that_row_alone(dtype, kernel, gen):
    """A token whose K holds NaN (stored as NaN, or as a NaN int8 scale) makes its sequence's output NaN, as an
    fp32 cache would (the runner then fails that request alone); the other sequences' outputs are unchanged."""
    if kernel == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter has no bfloat16")
    from lmservice.kernels.triton_attention import decode_attention_triton

    seq_lens = [20, 33, 7]
    b = make_paged_batch(seq_lens, [1, 1, 1], 16, 3, torch.float32, gen)
    k_cache = b.k_cache.clone()
    k_cache[int(b.block_tables[1, 1]), 3, 2, 5] = float("nan")  # sequence 1, token 19, head 2
    attend = {"torch": decode_attention_torch, "triton": decode_attention_triton}.get(kernel) or LIB.decode_attention
    outs = []
    for cache in (b.k_cache, k_cache):
        (k, ks), (v, vs) = narrow(cache, dtype), narrow(b.v_cache, dtype)
        outs.append(attend(b.q, k, v, b.seq_lens, b.block_tables, SCALE, None, ks, vs))
    clean, poisoned = outs
    assert poisoned[1, 2].isnan().all() and torch.equal(poisoned[1, :2], clean[1, :2])
    assert torch.equal(poisoned[[0, 2]], clean[[0, 2]])


@NEEDS_C
@pytest.mark.parametrize("dtype", [torch.float32, *NARROW], ids=["fp32", *IDS])
def test_c_write_stores_what_the_reference_stores(dtype, gen):
    """Bit for bit: round to nearest even (ties, fp16 subnormals and overflow to infinity included), int8 values
    and scales; padding slots skipped; a head with NaN or infinity poisoned alone. Rows are views of a qkv."""
    num_blocks, block_size, num_heads, head_dim = 4, 16, 3, 64
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:24]
    slots[[0, 11, 23]] = -1
    _, key, value = qkv_views(24, num_heads, head_dim, torch.float32, gen)
    key[1] *= 1e-6  # fp16 subnormals
    key[2] *= 1e4  # past fp16's largest value
    key[3, 0, :8] = torch.tensor([1.0 + 2**-11, 1.0 + 3 * 2**-11, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 2**-24, 3 * 2**-25,
                                  65504.0, 65520.0])  # ties for fp16 and bf16; fp16's smallest subnormal; its limit
    key[4, 1, 3], value[5, 2, 0], key[6, 0, 1] = float("nan"), float("inf"), -float("inf")
    caches = []
    for _ in range(2):
        k_cache = torch.zeros(num_blocks, block_size, num_heads, head_dim).to(dtype)
        scales = [torch.zeros(num_blocks, block_size, num_heads) for _ in range(2)] if dtype == torch.int8 else [None] * 2
        caches.append((k_cache, k_cache.clone(), *scales))
    write_kv_cache_torch(key, value, *caches[0][:2], slots, *caches[0][2:])
    LIB.write_kv_cache(key, value, *caches[1][:2], slots, *caches[1][2:])
    for ref, got in zip(caches[0], caches[1], strict=True):
        if ref is not None:
            torch.testing.assert_close(got, ref, atol=0, rtol=0, equal_nan=True)


# ---- Triton, under the interpreter (bf16: see the skip's reason)

BF16_SKIP = pytest.param(torch.bfloat16, marks=pytest.mark.skip(
    reason="Triton's CPU interpreter has no bfloat16 (numpy has none); the bf16 paths are the fp16 ones with "
           "another element type, compiled for sm_90 by test_compile_sm90.py"))
TRITON_DTYPES = [torch.float16, BF16_SKIP, torch.int8]


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=IDS)
def test_triton_write_stores_what_the_reference_stores(dtype, gen):
    from lmservice.kernels.triton_kv_cache import write_kv_cache_triton

    num_blocks, block_size, num_heads = 5, 16, 12
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:35]
    slots[[0, 7, 34]] = -1
    _, key, value = qkv_views(35, num_heads, 64, torch.float32, gen)
    key[3] *= 1e-3
    key[4, 1, 3], value[5, 2, 0] = float("nan"), float("inf")
    key[6, 0, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # a head with scale 1: ties to even
    caches = []
    for _ in range(2):
        k_cache = torch.full((num_blocks, block_size, num_heads, 64), float("nan")).to(dtype)
        scales = [torch.full((num_blocks, block_size, num_heads), float("nan")) for _ in range(2)] \
            if dtype == torch.int8 else [None] * 2
        caches.append((k_cache, k_cache.clone(), *scales))
    write_kv_cache_torch(key, value, *caches[0][:2], slots, *caches[0][2:])
    write_kv_cache_triton(key, value, *caches[1][:2], slots, *caches[1][2:])
    for ref, got in zip(caches[0], caches[1], strict=True):
        if ref is not None:
            torch.testing.assert_close(got, ref, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=IDS)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_attention_on_a_narrow_cache_matches_the_reference(dtype, num_splits, gen):
    from lmservice.kernels.triton_attention import decode_attention_triton, prefill_attention_triton

    seq_lens, q_lens = [1, 15, 17, 40, 70], [1, 15, 3, 1, 20]
    b, k, v, ks, vs = narrow_batch(16, seq_lens, q_lens, dtype, gen)
    args = (b.cu_seqlens_q, b.seq_lens, b.block_tables, SCALE)
    torch.testing.assert_close(prefill_attention_triton(b.q, k, v, *args, ks, vs),
                               prefill_attention_torch(b.q, k, v, *args, ks, vs), atol=1e-5, rtol=1e-5)
    last = (b.cu_seqlens_q[1:] - 1).long()
    got = decode_attention_triton(b.q[last], k, v, b.seq_lens, b.block_tables, SCALE, None, ks, vs,
                                  num_splits=num_splits)
    want = decode_attention_torch(b.q[last], k, v, b.seq_lens, b.block_tables, SCALE, None, ks, vs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
