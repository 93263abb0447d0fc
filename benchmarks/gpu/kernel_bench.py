"""The attention kernels against PyTorch's fastest path on the same shapes, bf16, head_dim 64, 12 heads.

Prefill: TFLOP/s of the varlen paged kernel (contiguous block tables) against F.scaled_dot_product_attention
with the flash backend on contiguous (B, nh, L, hd) tensors; goal >= 0.8x. Decode: the paged split-KV kernel
(one graphed call, the split count the wrapper picks) as KV bytes read per second against the device's copy
bandwidth (torch's device-to-device copy, bytes read + written); goal >= 0.6x where the KV read is large
enough to fill the GPU (>= 64 MB). Each row first checks the kernel's output against its reference; the goals
are reported, not enforced. Times are medians of CUDA-event timed calls (benchmarks/kernels.py's Setup).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.gpu.common import Step
from benchmarks.kernels import _check, _paged, bench_copy_and_matmul

NUM_HEADS, SCALE = 12, 0.125


def bench_prefill(step: Step, setup) -> None:
    from lmservice.kernels.triton_attention import prefill_attention_triton

    rows = []
    num_heads = 2 if step.dry else NUM_HEADS
    shapes = [(s, b) for s in (32, 48) for b in (1, 2)] if step.dry else \
        [(s, b) for s in (512, 1024, 2048, 4096) for b in (1, 8, 64)]
    for seq_len, num_seqs in shapes:
        k, v, k_cache, v_cache, tables = _paged(setup, num_seqs, seq_len, num_heads, shuffle=False)
        q = torch.randn_like(k)  # (B, L, nh, hd)
        dev = setup.device
        cu = torch.arange(num_seqs + 1, device=dev, dtype=torch.int32) * seq_len
        seq_lens = torch.full((num_seqs,), seq_len, device=dev, dtype=torch.int32)
        qf = q.flatten(0, 1)  # (B * L, nh, hd)
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, nh, L, hd)

        def sdpa(qt=qt, kt=kt, vt=vt):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=SCALE)

        def ours(qf=qf, k_cache=k_cache, v_cache=v_cache, cu=cu, seq_lens=seq_lens, tables=tables):
            return prefill_attention_triton(qf, k_cache, v_cache, cu, seq_lens, tables, SCALE)

        if step.cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ref, t_sdpa = sdpa(), setup.time_us(sdpa)
        else:
            ref, t_sdpa = sdpa(), setup.time_us(sdpa)
        check, ok = _check(ours(), ref.transpose(1, 2).flatten(0, 1))
        step.check(f"prefill b{num_seqs} L{seq_len} output", ok, check)
        flops = 4 * num_seqs * num_heads * 64 * seq_len * (seq_len + 1) / 2  # causal: two matmuls over half
        tf, tf_sdpa = flops / setup.time_us(ours) / 1e6, flops / t_sdpa / 1e6
        ratio = tf / tf_sdpa
        rows.append([seq_len, num_seqs, f"{tf:.1f}", f"{tf_sdpa:.1f}", f"{ratio:.2f}x", _met(step, ratio >= 0.8), check])
        step.metrics.setdefault("prefill", []).append({"seq_len": seq_len, "batch": num_seqs, "tflops": tf,
                                                       "sdpa_flash_tflops": tf_sdpa})
        del k, v, k_cache, v_cache, q, qt, kt, vt
    step.table(f"prefill attention, bf16, hd 64, {num_heads} heads, causal: Triton paged varlen vs SDPA (flash)",
               ["seq", "batch", "ours TFLOP/s", "SDPA flash TFLOP/s", "ratio", "goal >= 0.8x", "check"], rows)


def bench_decode(step: Step, setup) -> None:
    from lmservice.kernels.attention import decode_attention_torch
    from lmservice.kernels.triton_attention import choose_num_splits, decode_attention_triton

    rows = []
    num_heads = 2 if step.dry else NUM_HEADS
    batches, contexts = ((1, 3), (20, 40)) if step.dry else ((1, 8, 32, 128, 256), (128, 512, 2048))
    for block_size in (16, 32):
        for num_seqs in batches:
            for ctx in contexts:
                _, _, k_cache, v_cache, tables = _paged(setup, num_seqs, ctx, num_heads, block_size=block_size)
                q = torch.randn(num_seqs, num_heads, 64, device=setup.device, dtype=setup.dtype)
                seq_lens = torch.full((num_seqs,), ctx, device=setup.device, dtype=torch.int32)
                args = (q, k_cache, v_cache, seq_lens, tables, SCALE)
                check, ok = _check(decode_attention_triton(*args), decode_attention_torch(*args))
                step.check(f"decode b{num_seqs} ctx{ctx} bs{block_size} output", ok, check)
                num_sms = torch.cuda.get_device_properties(0).multi_processor_count if step.cuda else 1
                splits = choose_num_splits(num_seqs, num_heads, tables.shape[1] * block_size, num_sms)
                t = setup.time_graphed_us(lambda args=args: decode_attention_triton(*args), calls=20)
                t = t if t is not None else setup.time_us(lambda args=args: decode_attention_triton(*args))
                nbytes = 2 * k_cache[0, 0].nbytes * ctx * num_seqs  # K and V of every context token, read once
                gbps = nbytes / t / 1e3
                ratio = gbps / setup.copy_gbps
                goal = _met(step, ratio >= 0.6) if nbytes >= 64e6 else "-"
                rows.append([num_seqs, ctx, block_size, splits, f"{t:.1f}", f"{nbytes / 1e6:.1f}", f"{gbps:.0f}",
                             f"{ratio:.2f}x", goal, check])
                step.metrics.setdefault("decode", []).append({"batch": num_seqs, "ctx": ctx, "block_size": block_size,
                                                              "us": t, "gbps": gbps, "splits": splits})
                del k_cache, v_cache
    step.table(f"paged decode attention, bf16, hd 64, {num_heads} heads (one graphed call): KV bytes/time vs copy "
               f"bandwidth {setup.copy_gbps:.0f} GB/s", ["batch", "context", "block size", "splits", "us", "KV MB",
                                                         "GB/s", "x copy", "goal >= 0.6x (KV >= 64 MB)", "check"], rows)


def _met(step: Step, met: bool) -> str:
    return "-" if step.dry else ("yes" if met else "NO")


def run(step: Step) -> None:
    setup = step.setup(torch.bfloat16)
    setup.copy_gbps, tflops = bench_copy_and_matmul(setup)
    step.metrics.update(copy_gbps=setup.copy_gbps, matmul_bf16_tflops=tflops)
    for part in (bench_prefill, bench_decode):
        step.run_part(part, setup)
        if step.cuda:
            torch.cuda.empty_cache()
    if step.cuda:
        from lmservice.kernels import triton_attention

        step.metrics["prefill_best_config"] = str(getattr(triton_attention._prefill_kernel, "best_config", None))
