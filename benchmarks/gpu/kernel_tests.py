"""Every Triton kernel, compiled for the GPU, against its torch reference on the same device.

tests/kernels/ check the kernels under the CPU interpreter; this step runs their cases (built by the same
helpers) on CUDA, where the compiler and the autotuned tiles are in play, plus lengths that cross the
GPU's own tiles (prefill BLOCK_M up to 128, BLOCK_N 64). References run on fp32 copies of the inputs and
the error is norm-relative (benchmarks/gpu/common.py's REL_TOL). torch.empty/empty_like start as NaN
while the kernels run, so an output element a kernel forgets to write fails its check.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from benchmarks.gpu.common import REL_TOL, Step

SCALE = 0.125
# (block_size, num_heads, dtype): fp32 (parity), bf16 (serving), fp16; both block sizes
PAGED_CASES = [(16, 12, torch.float32), (16, 25, torch.bfloat16), (32, 25, torch.float16), (32, 12, torch.float32)]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def poisoned_allocations():
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: poisoned(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poisoned(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def _paged_batch(step: Step, seq_lens, q_lens, block_size, num_heads, dtype, seed):
    """tests/kernels/paged_batch.py's batch moved to the device; q stays a strided view of a fused projection."""
    from tests.kernels.paged_batch import make_paged_batch

    b = make_paged_batch(seq_lens, q_lens, block_size, num_heads, dtype, torch.Generator().manual_seed(seed))
    qkv = torch.full((b.q.shape[0], 3, *b.q.shape[1:]), float("nan"), dtype=dtype, device=step.device)
    qkv[:, 0] = b.q.to(step.device)
    dev = {k: getattr(b, k).to(step.device) for k in ("k_cache", "v_cache", "cu_seqlens_q", "seq_lens", "block_tables")}
    return replace(b, q=qkv[:, 0], **dev)


def check_attention(step: Step) -> None:
    from lmservice.kernels.attention import decode_attention_torch, prefill_attention_torch
    from lmservice.kernels.triton_attention import decode_attention_triton, prefill_attention_triton

    # the interpreter runs one program at a time: few heads in a dry run
    cases = [(bs, 2 + i, dt) for i, (bs, _, dt) in enumerate(PAGED_CASES[:2])] if step.dry else PAGED_CASES
    for i, (bs, nh, dtype) in enumerate(cases):
        tag = f"bs{bs} h{nh} {_name(dtype)}"
        # whole prompts, chunks after a cached prefix, lone last tokens; on a GPU also past 128-row tiles
        seq_lens = [1, bs - 1, bs + 1, 2 * bs + 3] + ([] if step.dry else [129, 300, 1000])
        q_lens = [1, bs - 1, 3, 1] + ([] if step.dry else [129, 300, 37])
        b = _paged_batch(step, seq_lens, q_lens, bs, nh, dtype, seed=i)
        ref_args = (b.q.float(), b.k_cache.float(), b.v_cache.float(), b.cu_seqlens_q, b.seq_lens, b.block_tables)
        out = prefill_attention_triton(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.seq_lens, b.block_tables, SCALE)
        step.check_close(f"prefill {tag}", out, prefill_attention_torch(*ref_args, SCALE), REL_TOL[dtype])

        seq_lens = [1, bs - 1, bs, bs + 1, 3 * bs + 5] + ([] if step.dry else [700, 2000])
        b = _paged_batch(step, seq_lens, [1] * len(seq_lens), bs, nh, dtype, seed=10 + i)
        args = (b.q, b.k_cache, b.v_cache, b.seq_lens, b.block_tables, SCALE)
        ref = decode_attention_torch(b.q.float(), b.k_cache.float(), b.v_cache.float(), b.seq_lens, b.block_tables, SCALE)
        for splits in (None, 1, 3) if step.dry else (None, 1, 2, 3, 8):
            out = decode_attention_triton(*args, num_splits=splits)
            step.check_close(f"decode {tag} splits={splits or 'auto'}", out, ref, REL_TOL[dtype])
        lens = b.seq_lens.clone()
        lens[1] = 0  # a CUDA graph's padding row: zeros, no reads
        for splits in (1, 2):
            out = decode_attention_triton(b.q, b.k_cache, b.v_cache, lens, b.block_tables, SCALE, num_splits=splits)
            step.check(f"decode padding row gives zeros {tag} splits={splits}", bool((out[1] == 0).all()))


def check_kv_write(step: Step) -> None:
    from lmservice.kernels.kv_cache import write_kv_cache_torch
    from lmservice.kernels.triton_kv_cache import write_kv_cache_triton
    from tests.kernels.paged_batch import qkv_views

    for bs, nh, dtype in [(16, 12, torch.float32), (16, 25, torch.bfloat16), (32, 25, torch.float16)]:
        nh = 2 if step.dry else nh
        gen = torch.Generator().manual_seed(bs * nh)
        num_blocks, num_tokens = 5 if step.dry else 64, 2 * bs + 3 if step.dry else 40 * bs + 3
        slots = torch.randperm(num_blocks * bs, generator=gen)[:num_tokens]
        slots[[0, 7, num_tokens - 1]] = -1  # padding rows, first and last included
        _, key, value = (t.to(step.device) for t in qkv_views(num_tokens, nh, 64, dtype, gen))
        slots = slots.to(step.device)
        caches = [torch.full((num_blocks, bs, nh, 64), float("nan"), dtype=dtype, device=step.device) for _ in range(4)]
        write_kv_cache_triton(key, value, caches[0], caches[1], slots)
        write_kv_cache_torch(key, value, caches[2], caches[3], slots)

        def same(caches=caches):
            torch.testing.assert_close(caches[0], caches[2], atol=0, rtol=0, equal_nan=True)
            torch.testing.assert_close(caches[1], caches[3], atol=0, rtol=0, equal_nan=True)

        step.run_check(f"kv write bs{bs} h{nh} {_name(dtype)} (exact, padding skipped)", same)


def check_pointwise(step: Step) -> None:
    from lmservice.kernels.activation import bias_gelu_torch
    from lmservice.kernels.norm import add_layer_norm_torch
    from lmservice.kernels.triton_activation import bias_gelu_triton
    from lmservice.kernels.triton_norm import add_layer_norm_triton

    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.float16] if step.dry else [torch.float32, torch.float16, torch.bfloat16]
    for dtype in dtypes:
        for hidden, with_residual in [(768, True), (100, True), (1600, True), (768, False)]:
            wide = (torch.randn(7 if step.dry else 300, hidden + 5, generator=gen) * 3 + 1).to(step.device, dtype)
            x = wide[:, 2:hidden + 2]  # strided rows, as a slice of a wider activation
            r = torch.randn(x.shape, generator=gen).to(step.device, dtype) if with_residual else None
            w, b = (torch.randn(hidden, generator=gen).to(step.device, dtype) for _ in range(2))
            out, h = add_layer_norm_triton(x, r, w, b, 1e-5)
            _, ref_h = add_layer_norm_torch(x, r, w, b, 1e-5)
            ref_out, _ = add_layer_norm_torch(x.float(), None if r is None else r.float(), w.float(), b.float(), 1e-5)
            tag = f"{hidden} residual={with_residual} {_name(dtype)}"
            step.run_check(f"add+layernorm h {tag} (exact)", lambda h=h, ref_h=ref_h: torch.testing.assert_close(
                h, ref_h, atol=0, rtol=0))
            step.check_close(f"add+layernorm out {tag}", out, ref_out, REL_TOL[dtype])
        for rows, n, with_bias in [(3, 3072, True), (5, 100, True), (5, 100, False)] + ([] if step.dry else [(64, 6400, True)]):
            x = (torch.randn(rows, n, generator=gen) * 4).to(step.device, dtype)
            x[0, :4] = torch.tensor([-30.0, 30.0, -8.0, 0.0])  # sigmoid saturation, zero
            bias = torch.randn(n, generator=gen).to(step.device, dtype) if with_bias else None
            ref = bias_gelu_torch(x.float(), None if bias is None else bias.float())
            step.check_close(f"bias+gelu {rows}x{n} bias={with_bias} {_name(dtype)}", bias_gelu_triton(x, bias), ref,
                             REL_TOL[dtype])


def check_lora(step: Step) -> None:
    """tests/kernels/test_triton_lora.py's batches and stacks (on CUDA when there is one): NaN in the rows of
    tokens without adapter and in an unused slot, y a column slice of a wider tensor."""
    from lmservice.kernels.lora import add_lora_torch
    from tests.kernels.test_triton_lora import TOLERANCES, make_batch, make_stacks, run_kernel

    batches = {"mixed": ([2, 0, -1, 1, 1], [18, 1, 1, 1, 4])}
    if not step.dry:
        batches.update(prefill=([0, 2, -1, 1, 2], [5, 20, 3, 17, 1]), decode=([1, -1, 0, 2, 2, 1, 0], [1] * 7))
    for dtype in [torch.float32] if step.dry else [torch.float32, torch.float16, torch.bfloat16]:
        for batch, (seq_slots, query_lens) in batches.items():
            for kernel in ("bgmv", "sgmv", "dispatch"):
                uses_dot = kernel == "sgmv" or (kernel == "dispatch" and batch != "decode")
                if step.dry and dtype == torch.bfloat16 and uses_dot:
                    continue  # the interpreter computes tl.dot on bf16 wrongly (raw bits): GPU only
                lora_a, lora_b = make_stacks([8, 2, 5], dtype)
                mapping, x, y = make_batch(seq_slots, query_lens, dtype)
                expected = y.clone()
                add_lora_torch(expected, x, lora_a[:3], lora_b[:3], mapping)  # the reference never sees the NaN slot
                run_kernel(kernel, y, x, lora_a, lora_b, mapping)
                step.run_check(f"lora {kernel} {batch} {_name(dtype)}", lambda y=y, e=expected, t=TOLERANCES[dtype]:
                               torch.testing.assert_close(y, e, equal_nan=True, **t))


def run(step: Step) -> None:
    import triton

    step.metrics["triton_interpret"] = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else None
    if step.cuda:
        step.check("kernels compiled, not interpreted", not step.metrics["triton_interpret"])
    with poisoned_allocations():
        for part in (check_attention, check_kv_write, check_pointwise, check_lora):
            step.run_part(part)
    if step.cuda:
        from lmservice.kernels import triton_attention

        best = getattr(triton_attention._prefill_kernel, "best_config", None)
        step.metrics["prefill_best_config"] = str(best)
    num_ok = sum(c["ok"] for c in step.checks)
    step.table("kernel checks (compiled for the GPU, vs torch references on fp32 copies)",
               ["checks", "passed", "failed"], [[len(step.checks), num_ok, len(step.checks) - num_ok]])
