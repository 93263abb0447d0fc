"""Triton paged attention: varlen (chunked) prefill and split-KV decode.

Same signatures and cache layout as lmservice/kernels/attention.py (the torch reference):
    k_cache, v_cache: (num_blocks, block_size, num_heads, head_dim)
    token t of sequence s lives in block block_tables[s, t // block_size], row t % block_size.

Both kernels gather K/V through the block tables one token row at a time, so the
tile width BLOCK_N is independent of block_size and a prefix-cached or chunked
prefill attends to its cached context without a copy.

The cache may be stored narrower than q (lmservice/kernels/kv_cache.py): tiles are widened as they are loaded,
int8 ones times their per-token-and-head scales.

NOTE: the CPU interpreter (TRITON_INTERPRET=1) has no bf16 arithmetic, so on CPU
the prefill casts its tiles to fp32 right after loading (UPCAST); on CUDA its dots
take the storage dtype (tensor cores) and accumulate in fp32, and fp32 inputs use
IEEE dots, not TF32, so an fp32 model keeps parity with the reference. Decode is
memory-bound and always computes in fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
MIN_TOKENS_PER_SPLIT = 128  # a decode split shorter than this costs more to merge than it saves
MAX_SPLITS = 32


def _on_gpu() -> bool:
    return torch.cuda.is_available() and not triton.knobs.runtime.interpret


def _autotune_on_gpu(configs: list[triton.Config], key: list[str]):
    """@triton.autotune needs a GPU; under the interpreter the wrapper passes fixed blocks."""

    def wrap(fn):
        return triton.autotune(configs=configs, key=key)(fn) if _on_gpu() else fn

    return wrap


def _launch_options(t: torch.Tensor) -> dict:
    """UPCAST and DOT_PRECISION for tensors of t's dtype on t's device (see module docstring)."""
    return {
        "UPCAST": t.device.type != "cuda" or bool(triton.knobs.runtime.interpret),
        "DOT_PRECISION": "ieee" if t.dtype == torch.float32 else "tf32",
    }


_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)


def _check_paged_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables,
                        k_scales: torch.Tensor | None, v_scales: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks the shapes the kernels assume; returns the scales to pass (the cache itself where there are none:
    the kernels read them only for an int8 cache)."""
    num_heads, head_dim = q.shape[1:]
    assert q.dim() == 3 and q.stride(-1) == 1, f"q must be (num_tokens, num_heads, head_dim), got {q.shape}"
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_heads, head_dim), (
        f"cache {tuple(k_cache.shape)} does not match q heads/dim {(num_heads, head_dim)}"
    )
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride(), "k/v caches differ in layout"
    assert k_cache.stride(-1) == 1, "cache head_dim must be contiguous"
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in _KV_DTYPES, f"caches {k_cache.dtype}, {v_cache.dtype}"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim {head_dim} must be a power of two >= 16"
    assert block_tables.dim() == 2 and not block_tables.is_floating_point(), "block_tables: (num_seqs, max_blocks) int"
    if k_cache.dtype != torch.int8:
        return k_cache, v_cache
    assert k_scales is not None and v_scales is not None, "an int8 KV cache needs its scales"
    assert k_scales.shape == v_scales.shape == k_cache.shape[:3] and k_scales.stride() == v_scales.stride()
    assert k_scales.dtype == v_scales.dtype == torch.float32 and k_scales.stride(2) == 1
    return k_scales, v_scales


# --------------------------------------------------------------------------- prefill


@triton.jit
def _prefill_tile(
    acc, l_i, m_i, q, q_pos, start_n, seq_len, table_row, K_CACHE, V_CACHE, K_SCALES, V_SCALES, head, scale_log2,
    stride_cb, stride_cr, stride_ch, stride_sb, stride_sr,
    CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, IS_INT8: tl.constexpr,
):
    """One K/V tile of the online softmax; CAUSAL tiles mask by position and by seq_len."""
    kv_pos = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = kv_pos < seq_len
    block_ids = tl.load(table_row + kv_pos // BLOCK_SIZE, mask=in_seq, other=0).to(tl.int64)
    rows = block_ids * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cr + head * stride_ch  # (BLOCK_N,)
    if CAUSAL:
        # masked loads: rows past seq_len may hold NaN garbage, and 0 * NaN poisons p @ v
        k = tl.load(K_CACHE + rows[None, :] + offs_d[:, None], mask=in_seq[None, :], other=0.0)  # (D, N)
        v = tl.load(V_CACHE + rows[:, None] + offs_d[None, :], mask=in_seq[:, None], other=0.0)  # (N, D)
    else:
        k = tl.load(K_CACHE + rows[None, :] + offs_d[:, None])  # (D, N)
        v = tl.load(V_CACHE + rows[:, None] + offs_d[None, :])  # (N, D)
    if IS_INT8:  # widened times each token's scale, then to q's dtype (the dots' operand type)
        scale_rows = block_ids * stride_sb + (kv_pos % BLOCK_SIZE) * stride_sr + head  # (BLOCK_N,)
        ks = tl.load(K_SCALES + scale_rows, mask=in_seq, other=0.0)
        vs = tl.load(V_SCALES + scale_rows, mask=in_seq, other=0.0)
        k = (k.to(tl.float32) * ks[None, :]).to(q.dtype)
        v = (v.to(tl.float32) * vs[:, None]).to(q.dtype)
    else:
        k = k.to(q.dtype)  # a no-op unless the cache is narrower than q (or UPCAST made q fp32)
        v = v.to(q.dtype)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # (M, N), log2 units
    if CAUSAL:
        visible = (kv_pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@_autotune_on_gpu(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 2)]
    ],
    key=["HEAD_DIM", "BLOCK_SIZE"],
)
@triton.jit
def _prefill_kernel(
    Q, K_CACHE, V_CACHE, K_SCALES, V_SCALES, OUT, CU_SEQLENS_Q, SEQ_LENS, BLOCK_TABLES, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cr, stride_ch, stride_sb, stride_sr, stride_bt,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, IS_INT8: tl.constexpr,
):
    m_block = tl.program_id(0)  # fastest: neighbouring programs share K/V in L2
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(CU_SEQLENS_Q + seq)
    q_len = tl.load(CU_SEQLENS_Q + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(SEQ_LENS + seq)
    first_pos = seq_len - q_len  # the cached prefix: query 0 sits at this context position

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_pos = first_pos + offs_m  # (M,)
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=(offs_m < q_len)[:, None], other=0.0)  # (M, D)
    if UPCAST:
        q = q.to(tl.float32)
    table_row = BLOCK_TABLES + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # keys before the block's first query are visible to all its rows: no mask needed
    full_end = (first_pos + m_block * BLOCK_M) // BLOCK_N * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _prefill_tile(
            acc, l_i, m_i, q, q_pos, start_n, seq_len, table_row, K_CACHE, V_CACHE, K_SCALES, V_SCALES, head,
            scale_log2, stride_cb, stride_cr, stride_ch, stride_sb, stride_sr, False, BLOCK_SIZE, HEAD_DIM, BLOCK_N,
            UPCAST, DOT_PRECISION, IS_INT8,
        )
    kv_end = tl.minimum(seq_len, first_pos + (m_block + 1) * BLOCK_M)
    for start_n in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _prefill_tile(
            acc, l_i, m_i, q, q_pos, start_n, seq_len, table_row, K_CACHE, V_CACHE, K_SCALES, V_SCALES, head,
            scale_log2, stride_cb, stride_cr, stride_ch, stride_sb, stride_sr, True, BLOCK_SIZE, HEAD_DIM, BLOCK_N,
            UPCAST, DOT_PRECISION, IS_INT8,
        )
    # every stored row saw key 0, so l_i > 0 there
    out = acc / l_i[:, None]
    tl.store(OUT + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=(offs_m < q_len)[:, None])


def prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed query chunks against their paged context; see prefill_attention_torch.

    NOTE: reads max(q_len) to the host to size the grid, so a prefill is not CUDA-graph capturable.
    """
    k_scales, v_scales = _check_paged_inputs(q, k_cache, v_cache, block_tables, k_scales, v_scales)
    num_seqs = seq_lens.shape[0]
    assert cu_seqlens_q.shape == (num_seqs + 1,), f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} vs {num_seqs} seqs"
    assert block_tables.shape[0] == num_seqs, "one block table row per sequence"
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    is_tuned = isinstance(_prefill_kernel, triton.runtime.Autotuner)
    fixed = {} if is_tuned else {"BLOCK_M": 16, "BLOCK_N": 16}  # small tiles: tests cross many tile edges

    def grid(meta):
        return (triton.cdiv(max_q_len, meta["BLOCK_M"]), num_heads, num_seqs)

    _prefill_kernel[grid](
        q, k_cache, v_cache, k_scales, v_scales, out, cu_seqlens_q, seq_lens, block_tables, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scales.stride(0), k_scales.stride(1),
        block_tables.stride(0), BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, **fixed, **_launch_options(q),
        IS_INT8=k_cache.dtype == torch.int8,
    )
    return out


# --------------------------------------------------------------------------- decode


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(num_seqs: int, num_heads: int, max_context: int, num_sms: int) -> int:
    """How many KV partitions per (sequence, head): enough programs for ~4 per SM,
    each partition at least MIN_TOKENS_PER_SPLIT long, at most MAX_SPLITS."""
    programs = num_seqs * num_heads
    wanted = triton.cdiv(4 * num_sms, programs)
    by_length = max(1, max_context // MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, by_length, MAX_SPLITS))


@triton.jit
def _decode_kernel(
    Q, K_CACHE, V_CACHE, K_SCALES, V_SCALES, OUT, PART_OUT, PART_LSE, SEQ_LENS, BLOCK_TABLES, scale_log2,
    stride_qs, stride_qh, stride_os, stride_oh, stride_cb, stride_cr, stride_ch, stride_sb, stride_sr, stride_bt,
    num_splits, IS_SPLIT: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_INT8: tl.constexpr,
):
    """One (sequence, head, split): softmax over its partition of the context.
    num_splits is a runtime value, so a new split count does not compile a new kernel mid-serving.
    Without IS_SPLIT (num_splits == 1) it writes OUT; otherwise the normalised partial output and its
    log2-sum-exp go to PART_OUT/PART_LSE for _decode_merge_kernel."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + seq)
    # partitions are sized per sequence, so every sequence spreads over all splits
    part_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * part_len
    hi = tl.minimum(lo + part_len, seq_len)

    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + seq.to(tl.int64) * stride_qs + head * stride_qh + offs_d).to(tl.float32)  # (D,)
    table_row = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        kv_pos = start_n + tl.arange(0, BLOCK_N)
        valid = kv_pos < hi
        block_ids = tl.load(table_row + kv_pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        rows = block_ids * stride_cb + (kv_pos % BLOCK_SIZE) * stride_cr + head * stride_ch  # (N,)
        k = tl.load(K_CACHE + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # (N, D)
        v = tl.load(V_CACHE + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # (N, D)
        k = k.to(tl.float32)  # memory-bound: fp32 math is free, and the interpreter needs it for bf16
        v = v.to(tl.float32)
        if IS_INT8:
            scale_rows = block_ids * stride_sb + (kv_pos % BLOCK_SIZE) * stride_sr + head  # (N,)
            k = k * tl.load(K_SCALES + scale_rows, mask=valid, other=0.0)[:, None]
            v = v * tl.load(V_SCALES + scale_rows, mask=valid, other=0.0)[:, None]
        s = tl.sum(k * q[None, :], 1) * scale_log2  # (N,)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    # an empty partition (or a padding row with seq_len 0) gives zeros and lse -inf
    out = acc / tl.maximum(l_i, 1e-30)
    if not IS_SPLIT:
        tl.store(OUT + seq.to(tl.int64) * stride_os + head * stride_oh + offs_d, out.to(OUT.dtype.element_ty))
    else:
        part = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits + split
        tl.store(PART_OUT + part * HEAD_DIM + offs_d, out)
        tl.store(PART_LSE + part, m_i + tl.log2(tl.maximum(l_i, 1e-30)))


@triton.jit
def _decode_merge_kernel(
    OUT, PART_OUT, PART_LSE, stride_os, stride_oh, num_splits,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Combine the partitions of one (sequence, head) by log-sum-exp weights."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    part = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits + offs_s  # (S,)
    in_range = offs_s < num_splits
    lse = tl.load(PART_LSE + part, mask=in_range, other=float("-inf"))  # (S,)
    o = tl.load(PART_OUT + part[:, None] * HEAD_DIM + offs_d[None, :], mask=in_range[:, None], other=0.0)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty only for a seq_len 0 padding row
    w = tl.exp2(lse - m)  # empty splits weigh 0
    out = tl.sum(w[:, None] * o, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(OUT + seq.to(tl.int64) * stride_os + head * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


def plan_decode_triton(seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> None:
    """Nothing to prepare: the decode kernel reads the block tables in place."""
    return None


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    plan: None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """One query token per sequence against its paged context; see decode_attention_torch.

    num_splits=None picks the split from batch, heads, the block-table width (the
    longest context the table can address) and the SM count. No host sync and a grid
    that depends only on shapes: CUDA-graph capturable. `plan` is plan_decode_triton's (None). A padding row with seq_len 0
    (a graph's unused batch slot) gives zeros, where the reference gives NaN.
    """
    k_scales, v_scales = _check_paged_inputs(q, k_cache, v_cache, block_tables, k_scales, v_scales)
    num_seqs, num_heads, head_dim = q.shape
    assert seq_lens.shape == (num_seqs,) and block_tables.shape[0] == num_seqs, "one seq_len and table row per query"
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_sms = _num_sms(q.device.index or 0) if q.device.type == "cuda" else 1
        num_splits = choose_num_splits(num_seqs, num_heads, block_tables.shape[1] * block_size, num_sms)
    assert 1 <= num_splits <= 2 * MAX_SPLITS, f"num_splits {num_splits} out of range"
    if num_splits == 1:
        part_out = part_lse = out  # unused by the kernel
    else:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, device=q.device, dtype=torch.float32)
    on_cuda = q.device.type == "cuda"
    _decode_kernel[(num_seqs, num_heads, num_splits)](
        q, k_cache, v_cache, k_scales, v_scales, out, part_out, part_lse, seq_lens, block_tables, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scales.stride(0), k_scales.stride(1),
        block_tables.stride(0), num_splits, IS_SPLIT=num_splits > 1, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_N=64 if on_cuda else 16, IS_INT8=k_cache.dtype == torch.int8, num_warps=4,
    )
    if num_splits > 1:
        _decode_merge_kernel[(num_seqs, num_heads)](
            out, part_out, part_lse, out.stride(0), out.stride(1), num_splits,
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)), HEAD_DIM=head_dim,
        )
    return out


