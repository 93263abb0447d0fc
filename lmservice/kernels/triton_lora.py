"""Triton kernels for batched LoRA (the Punica scheme): shrink x -> x @ A.T, expand y += (x @ A.T) @ B.T.

Layout and semantics as lmservice/kernels/lora.py (`add_lora_torch` is the reference these are tested against):
    lora_a: (num_slots, max_rank, in_features), lora_b: (num_slots, out_features, max_rank), slot -1 = no adapter.

Two shapes of work:
- SGMV (segmented gather matrix-vector), for prefill: the tokens of one sequence are contiguous and share a
  slot, so a program loads one tile of its segment's A (or B) and multiplies BLOCK_M tokens by it (tl.dot).
  Grid: (num_segments, cdiv(max_seg_len, BLOCK_M)[, cdiv(out_features, BLOCK_N)]).
- BGMV (batched gather matrix-vector), for decode: one token per row, each with its own slot, read from
  `token_slots` on the device. Its grid depends only on num_tokens, so it can be captured in a CUDA graph.

The shrunk activations stay in fp32 between the two kernels and are rounded to the model dtype before the
expand, as the torch path's matmul in the model dtype does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmservice.kernels.lora import LoRAMapping, check_lora_shapes

BLOCK_M = 16  # tokens per SGMV tile (tl.dot needs >= 16)
BLOCK_K = 64  # in_features per step of the shrink loop
BLOCK_N = 64  # out_features per expand program


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, a_ptr, out_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr,
    in_features, rank,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    m_block = tl.program_id(1)
    seg_len = tl.load(seg_lens_ptr + seg)
    if m_block * BLOCK_M >= seg_len:  # a shorter segment than the longest: nothing left here
        return
    start = tl.load(seg_starts_ptr + seg)
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < seg_len
    rows = (start + offs_m).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + offs_k
        x_tile = tl.load(
            x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=row_mask[:, None] & (k[None, :] < in_features),
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        a_tile = tl.load(
            a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + k[:, None] * stride_ak,
            mask=(offs_r[None, :] < rank) & (k[:, None] < in_features),
            other=0.0,
        )  # (BLOCK_K, BLOCK_R): a tile of A[slot].T
        acc = tl.dot(x_tile, a_tile, acc, input_precision=DOT_PRECISION)
    tl.store(
        out_ptr + rows[:, None] * stride_om + offs_r[None, :],
        acc,
        mask=row_mask[:, None] & (offs_r[None, :] < rank),
    )


@triton.jit
def _sgmv_expand_kernel(
    xa_ptr, b_ptr, y_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr,
    out_features, rank,
    stride_xam, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    m_block = tl.program_id(1)
    n_block = tl.program_id(2)
    seg_len = tl.load(seg_lens_ptr + seg)
    if m_block * BLOCK_M >= seg_len:
        return
    start = tl.load(seg_starts_ptr + seg)
    slot = tl.load(seg_slots_ptr + seg).to(tl.int64)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < seg_len
    rows = (start + offs_m).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_features
    b_tile = tl.load(
        b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
        mask=(offs_r[:, None] < rank) & n_mask[None, :],
        other=0.0,
    )  # (BLOCK_R, BLOCK_N): a tile of B[slot].T
    xa_tile = tl.load(
        xa_ptr + rows[:, None] * stride_xam + offs_r[None, :],
        mask=row_mask[:, None] & (offs_r[None, :] < rank),
        other=0.0,
    )  # (BLOCK_M, BLOCK_R), fp32
    delta = tl.dot(xa_tile.to(b_tile.dtype), b_tile, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, out_ptr, token_slots_ptr,
    in_features, rank,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_om,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(token_slots_ptr + t).to(tl.int64)
    if slot < 0:  # NOTE: slot -1 = no adapter; its shrunk row is never written nor read
        return
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + offs_k
        x_vec = tl.load(x_ptr + t * stride_xm + k * stride_xk, mask=k < in_features, other=0.0)  # (BLOCK_K,)
        a_tile = tl.load(
            a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + k[None, :] * stride_ak,
            mask=(offs_r[:, None] < rank) & (k[None, :] < in_features),
            other=0.0,
        )  # (BLOCK_R, BLOCK_K)
        acc += tl.sum(a_tile.to(tl.float32) * x_vec.to(tl.float32)[None, :], axis=1)
    tl.store(out_ptr + t * stride_om + offs_r, acc, mask=offs_r < rank)


@triton.jit
def _bgmv_expand_kernel(
    xa_ptr, b_ptr, y_ptr, token_slots_ptr,
    out_features, rank,
    stride_xam, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    n_block = tl.program_id(1)
    slot = tl.load(token_slots_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < out_features
    b_tile = tl.load(
        b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
        mask=n_mask[:, None] & (offs_r[None, :] < rank),
        other=0.0,
    )  # (BLOCK_N, BLOCK_R)
    xa = tl.load(xa_ptr + t * stride_xam + offs_r, mask=offs_r < rank, other=0.0)  # (BLOCK_R,) fp32
    xa = xa.to(b_tile.dtype).to(tl.float32)  # rounded as the torch path's shrink output is
    delta = tl.sum(b_tile.to(tl.float32) * xa[None, :], axis=1)  # (BLOCK_N,)
    y_ptrs = y_ptr + t * stride_ym + offs_n * stride_yn
    y = tl.load(y_ptrs, mask=n_mask)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=n_mask)


def _check(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> int:
    """Shape, dtype and device contract; returns BLOCK_R (the rank padded to a tl.dot-able power of two)."""
    check_lora_shapes(y, x, lora_a, lora_b)
    assert x.dtype == y.dtype == lora_a.dtype == lora_b.dtype, (
        f"dtypes differ: x {x.dtype}, y {y.dtype}, lora_a {lora_a.dtype}, lora_b {lora_b.dtype}"
    )
    assert x.device == y.device == lora_a.device == lora_b.device, "all tensors must be on one device"
    return max(16, triton.next_power_of_2(lora_a.shape[1]))


def bgmv_add_lora(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor
) -> None:
    """Decode-shaped add_lora: every token's slot read from token_slots (num_tokens,) int on the device."""
    block_r = _check(y, x, lora_a, lora_b)
    num_tokens, in_features = x.shape
    out_features, rank = lora_b.shape[1], lora_a.shape[1]
    if num_tokens == 0:
        return
    shrunk = torch.empty(num_tokens, rank, dtype=torch.float32, device=x.device)  # (T, R)
    _bgmv_shrink_kernel[(num_tokens,)](
        x, lora_a, shrunk, token_slots,
        in_features, rank,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), shrunk.stride(0),
        BLOCK_R=block_r, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    _bgmv_expand_kernel[(num_tokens, triton.cdiv(out_features, BLOCK_N))](
        shrunk, lora_b, y, token_slots,
        out_features, rank,
        shrunk.stride(0), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0), y.stride(1),
        BLOCK_R=block_r, BLOCK_N=BLOCK_N,
    )  # fmt: skip


def sgmv_add_lora(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, mapping: LoRAMapping
) -> None:
    """Prefill-shaped add_lora over mapping.segments (contiguous token runs sharing one slot)."""
    block_r = _check(y, x, lora_a, lora_b)
    if mapping.is_empty:
        return
    num_tokens, in_features = x.shape
    out_features, rank = lora_b.shape[1], lora_a.shape[1]
    seg_starts, seg_lens, seg_slots = mapping.segment_tensors
    num_segments, m_blocks = len(mapping.segments), triton.cdiv(mapping.max_seg_len, BLOCK_M)
    # fp32 accumulation is exact enough for fp32 only without TF32
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    shrunk = torch.empty(num_tokens, rank, dtype=torch.float32, device=x.device)  # (T, R)
    _sgmv_shrink_kernel[(num_segments, m_blocks)](
        x, lora_a, shrunk, seg_starts, seg_lens, seg_slots,
        in_features, rank,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), shrunk.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=BLOCK_K, DOT_PRECISION=precision,
    )  # fmt: skip
    _sgmv_expand_kernel[(num_segments, m_blocks, triton.cdiv(out_features, BLOCK_N))](
        shrunk, lora_b, y, seg_starts, seg_lens, seg_slots,
        out_features, rank,
        shrunk.stride(0), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_N=BLOCK_N, DOT_PRECISION=precision,
    )  # fmt: skip


def add_lora_triton(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, mapping: LoRAMapping
) -> None:
    """Same contract as lmservice.kernels.lora.add_lora_torch: BGMV when every segment is one token (decode),
    SGMV otherwise (prefill chunks, mixed batches)."""
    if mapping.is_empty:
        check_lora_shapes(y, x, lora_a, lora_b)
        return
    if mapping.max_seg_len == 1:
        bgmv_add_lora(y, x, lora_a, lora_b, mapping.token_slots)
    else:
        sgmv_add_lora(y, x, lora_a, lora_b, mapping)
