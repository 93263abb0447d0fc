"""Build, check and time lmservice's Triton kernels; prints the summary table last.

    python benchmarks/kernels.py            # on a CUDA GPU: GPT-2 small and xl shapes, bf16, < 5 min
    python benchmarks/kernels.py --dry-run  # on CPU under TRITON_INTERPRET=1: every part on tiny shapes

Every row first checks the kernel's output against its reference (torch SDPA or the
lmservice/kernels/*_torch functions); a failed check makes the exit status 1. Goals are reported,
not enforced: this is a benchmark, not a test. On a GPU the device's copy bandwidth and
bf16 matmul rate are measured in the same run, times are medians of CUDA-event timed
calls after warm-up, and inputs are random (never zeros). Dry-run times are interpreter
times and mean nothing; the dry run exists to prove the script works end to end.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


@dataclass
class Row:
    kernel: str
    model: str
    shape: str
    measure: str
    result: str
    goal: str = "-"
    met: bool | None = None  # None: no goal for this row
    check: str = "ok"
    check_ok: bool = True


@dataclass
class Setup:
    """Device, dtype and sizes of one run; times in microseconds."""

    device: object
    dtype: object
    dry: bool
    warmup: int
    reps: int
    copy_gbps: float = 0.0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time_us(self, fn) -> float:
        import torch

        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(times)
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3

    def time_graphed_us(self, fn, calls: int) -> float | None:
        """Per-call time of `calls` back-to-back calls captured in one CUDA graph; None on CPU."""
        import torch

        if not self.cuda:
            return None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # compile and allocate outside the capture
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return self.time_us(graph.replay) / calls


def _check(out, ref, tol: float = 2e-2) -> tuple[str, bool]:
    """Norm-relative error: bf16 rounds each element by up to 2^-8 of its size, so an absolute
    bound would depend on the magnitudes; a wrong or unwritten element still shows."""
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    return f"rel err {rel:.1e}", rel <= tol


def _paged(setup: Setup, num_seqs: int, seq_len: int, num_heads: int, block_size: int = 16, shuffle: bool = True):
    """Random K/V of num_seqs sequences written into a paged cache; returns the contiguous K/V too."""
    import torch

    from lmservice.kernels.triton_kv_cache import write_kv_cache_triton

    dev, dt = setup.device, setup.dtype
    nb = -(-seq_len // block_size)
    ids = torch.randperm(num_seqs * nb, device=dev) if shuffle else torch.arange(num_seqs * nb, device=dev)
    tables = ids.view(num_seqs, nb).int()
    k = torch.randn(num_seqs, seq_len, num_heads, 64, device=dev, dtype=dt)  # (B, L, nh, hd)
    v = torch.randn_like(k)
    k_cache = torch.randn(num_seqs * nb, block_size, num_heads, 64, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    pos = torch.arange(seq_len, device=dev)
    slots = (tables[:, pos // block_size].long() * block_size + pos % block_size).flatten()  # (B * L,)
    write_kv_cache_triton(k.flatten(0, 1), v.flatten(0, 1), k_cache, v_cache, slots)
    return k, v, k_cache, v_cache, tables


def bench_copy_and_matmul(setup: Setup) -> tuple[float, float]:
    import torch

    n = (1 << 20) if setup.dry else (1 << 30)
    src = torch.randn(n // 4, device=setup.device)
    dst = torch.empty_like(src)
    gbps = 2 * src.nbytes / setup.time_us(lambda: dst.copy_(src)) / 1e3
    m = 128 if setup.dry else 8192
    a = torch.randn(m, m, device=setup.device, dtype=setup.dtype)
    b = torch.randn(m, m, device=setup.device, dtype=setup.dtype)
    tflops = 2 * m**3 / setup.time_us(lambda: a @ b) / 1e6
    return gbps, tflops


def bench_prefill(setup: Setup, model: str, num_heads: int) -> list[Row]:
    import torch
    import torch.nn.functional as F

    from lmservice.kernels.attention import prefill_attention_torch
    from lmservice.kernels.triton_attention import prefill_attention_triton

    rows = []
    scale = 0.125
    for seq_len in (32, 48) if setup.dry else (512, 1024):
        num_seqs = (96 if setup.dry else 16384) // seq_len
        dev = setup.device
        k, v, k_cache, v_cache, tables = _paged(setup, num_seqs, seq_len, num_heads, shuffle=False)
        q = torch.randn_like(k)  # (B, L, nh, hd)
        cu = torch.arange(num_seqs + 1, device=dev, dtype=torch.int32) * seq_len
        seq_lens = torch.full((num_seqs,), seq_len, device=dev, dtype=torch.int32)
        qf = q.flatten(0, 1)

        def sdpa(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, scale=scale)  # (B, nh, L, hd)

        if setup.cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ref = sdpa()
                t_sdpa = setup.time_us(sdpa)
        else:
            ref, t_sdpa = sdpa(), setup.time_us(sdpa)

        def run(qf=qf, k_cache=k_cache, v_cache=v_cache, cu=cu, seq_lens=seq_lens, tables=tables):
            return prefill_attention_triton(qf, k_cache, v_cache, cu, seq_lens, tables, scale)

        check, ok = _check(run(), ref.transpose(1, 2).flatten(0, 1))
        flops = 4 * num_seqs * num_heads * 64 * seq_len * (seq_len + 1) / 2  # causal: two matmuls
        tf, tf_sdpa = flops / setup.time_us(run) / 1e6, flops / t_sdpa / 1e6
        rows.append(Row("varlen prefill attention, contiguous", model, f"{num_seqs}x{seq_len}",
                        "TFLOP/s vs SDPA (flash)", f"{tf:.1f} vs {tf_sdpa:.1f} = {tf / tf_sdpa:.2f}x",
                        ">= 0.8x (stretch 1.1x)", tf >= 0.8 * tf_sdpa, check, ok))

        # the same context through shuffled block tables, queries = the second half after a cached prefix
        k, v, k_cache, v_cache, tables = _paged(setup, num_seqs, seq_len, num_heads, shuffle=True)
        q_len = seq_len // 2
        qc = torch.randn(num_seqs * q_len, num_heads, 64, device=dev, dtype=setup.dtype)
        cu_c = torch.arange(num_seqs + 1, device=dev, dtype=torch.int32) * q_len
        args = (qc, k_cache, v_cache, cu_c, seq_lens, tables, scale)
        check, ok = _check(prefill_attention_triton(*args), prefill_attention_torch(*args))
        flops_c = 4 * num_seqs * num_heads * 64 * (q_len * (seq_len - q_len) + q_len * (q_len + 1) / 2)
        tf_c = flops_c / setup.time_us(lambda args=args: prefill_attention_triton(*args)) / 1e6
        rows.append(Row("same, block tables + prefix-cached chunks", model, f"{num_seqs}x{q_len}/{seq_len}",
                        "TFLOP/s vs contiguous row", f"{tf_c:.1f} vs {tf:.1f} = {tf_c / tf:.2f}x", ">= 0.8x",
                        tf_c >= 0.8 * tf, check, ok))
    return rows


def bench_decode(setup: Setup, model: str, num_heads: int) -> list[Row]:
    import torch

    from lmservice.kernels.attention import decode_attention_torch
    from lmservice.kernels.triton_attention import choose_num_splits, decode_attention_triton

    rows = []
    for num_seqs in (1, 3) if setup.dry else (1, 8, 32, 256):
        for ctx in (20, 40) if setup.dry else (512, 1024):
            _, _, k_cache, v_cache, tables = _paged(setup, num_seqs, ctx, num_heads)
            q = torch.randn(num_seqs, num_heads, 64, device=setup.device, dtype=setup.dtype)
            seq_lens = torch.full((num_seqs,), ctx, device=setup.device, dtype=torch.int32)
            if setup.cuda:  # what the wrapper picks by default, made explicit for the shape column
                num_sms = torch.cuda.get_device_properties(setup.device).multi_processor_count
                splits = choose_num_splits(num_seqs, num_heads, tables.shape[1] * 16, num_sms)
            else:
                splits = 2 if num_seqs == 1 else 1  # the dry run covers both paths
            args = (q, k_cache, v_cache, seq_lens, tables, 0.125)
            check, ok = _check(decode_attention_triton(*args, num_splits=splits), decode_attention_torch(*args))
            call = functools.partial(decode_attention_triton, *args, num_splits=splits)
            t = setup.time_graphed_us(call, calls=20)
            t = t if t is not None else setup.time_us(call)
            nbytes = 2 * k_cache[0, 0].nbytes * ctx * num_seqs
            ratio = nbytes / t / 1e3 / setup.copy_gbps
            if nbytes >= 64e6:
                goal, met = ">= 0.6x copy bw", ratio >= 0.6
            elif nbytes < 8e6:
                goal, met = "<= 12 us", t <= 12
            else:
                goal, met = "-", None
            rows.append(Row("paged decode attention (graphed call)", model, f"b{num_seqs} ctx{ctx} split{splits}",
                            "us, KV bytes/time vs copy bw", f"{t:.1f} us, {nbytes / 1e6:.1f} MB, {ratio:.2f}x",
                            goal, met, check, ok))
    return rows


def _random_gpt2(setup: Setup, n_embd: int, n_layer: int, n_head: int, vocab_size: int):
    import torch

    from lmservice.model.config import GPT2Config
    from lmservice.model.gpt2 import GPT2ForServing

    config = GPT2Config.from_dict({"model_type": "gpt2", "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head,
                                   "vocab_size": vocab_size, "n_positions": 1024})
    torch.manual_seed(0)
    model = GPT2ForServing(config)
    with torch.no_grad():  # the serving model skips random init (the loader assigns every weight)
        model.transformer.wte.weight.normal_(0.0, 0.02)
        model.transformer.wpe.weight.normal_(0.0, 0.01)
    return model.to(device=setup.device, dtype=setup.dtype).eval()


def bench_decode_step(setup: Setup, model_name: str, dims: tuple[int, int, int, int]) -> list[Row]:
    import torch

    from lmservice.kernels import TORCH_OPS, load_ops
    from lmservice.model.gpt2 import AttentionMetadata

    model = _random_gpt2(setup, *dims)
    _, n_layer, n_head, vocab_size = dims
    ops = load_ops("triton")
    dev, rows = setup.device, []
    weight_bytes = sum(p.nbytes for n, p in model.named_parameters() if not n.endswith(("wte.weight", "wpe.weight")))
    for num_seqs in (1, 3) if setup.dry else (1, 32, 128):
        ctx = 20 if setup.dry else 512
        nb = -(-ctx // 16)
        tables = torch.randperm(num_seqs * nb, device=dev).view(num_seqs, nb).int()  # one table for every layer
        kv = [tuple(torch.randn(2, num_seqs * nb, 16, n_head, 64, device=dev, dtype=setup.dtype)) for _ in range(n_layer)]
        pos = torch.full((num_seqs,), ctx - 1, device=dev)
        empty = torch.zeros(0, device=dev, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=tables[:, (ctx - 1) // 16].long() * 16 + (ctx - 1) % 16, num_decode_tokens=num_seqs,
            decode_seq_lens=torch.full((num_seqs,), ctx, device=dev, dtype=torch.int32), decode_block_tables=tables,
            prefill_cu_seqlens_q=torch.zeros(1, device=dev, dtype=torch.int32), prefill_seq_lens=empty,
            prefill_block_tables=empty.view(0, 1))
        ids = torch.randint(0, vocab_size, (num_seqs,), device=dev)

        @torch.inference_mode()
        def step(ops=ops, ids=ids, pos=pos, meta=meta, kv=kv):
            return model.compute_logits(model(ids, pos, meta, kv, ops))  # (B, vocab)

        check, ok = _check(step(), step(ops=TORCH_OPS))
        eager = setup.time_us(step)
        graphed = setup.time_graphed_us(step, calls=1)
        floor = (weight_bytes + 2 * kv[0][0][0, 0].nbytes * ctx * num_seqs * n_layer) / setup.copy_gbps / 1e3
        if graphed is None:
            result, goal, met = f"eager {eager:.0f} us (graphs need CUDA)", "-", None
        elif num_seqs == 1:
            result = f"graphed {graphed:.0f} us, eager {eager:.0f} us = {eager / graphed:.2f}x"
            goal, met = ">= 2x eager", eager >= 2 * graphed
        else:
            result = f"graphed {graphed:.0f} us = {graphed / floor:.2f}x floor ({floor:.0f} us)"
            goal, met = "<= 1.6x floor", graphed <= 1.6 * floor
        rows.append(Row("whole decode step", model_name, f"b{num_seqs} ctx{ctx}", "graphed vs eager / floor",
                        result, goal, met, check, ok))
    return rows


def bench_pointwise(setup: Setup, model: str, hidden: int) -> list[Row]:
    import torch
    import torch.nn.functional as F

    from lmservice.kernels.activation import bias_gelu_torch
    from lmservice.kernels.norm import add_layer_norm_torch
    from lmservice.kernels.triton_activation import bias_gelu_triton
    from lmservice.kernels.triton_norm import add_layer_norm_triton

    rows, dev, dt = [], setup.device, setup.dtype
    for num_rows in (8,) if setup.dry else (4096, 16384):
        x, r = torch.randn(2, num_rows, hidden, device=dev, dtype=dt)
        w, b = torch.randn(2, hidden, device=dev, dtype=dt)
        out, h = add_layer_norm_triton(x, r, w, b, 1e-5)
        ref_out, ref_h = add_layer_norm_torch(x, r, w, b, 1e-5)
        check, ok = _check(torch.cat([out, h]), torch.cat([ref_out, ref_h]))
        t = setup.time_us(lambda x=x, r=r, w=w, b=b: add_layer_norm_triton(x, r, w, b, 1e-5))
        t_ref = setup.time_us(lambda x=x, r=r, w=w, b=b: F.layer_norm(x + r, (hidden,), w, b, 1e-5))
        bw = 4 * x.nbytes / t / 1e3 / setup.copy_gbps  # reads x, r; writes out, h
        rows.append(Row("fused residual + LayerNorm", model, f"{num_rows}x{hidden}", "vs add + F.layer_norm; copy bw",
                        f"{t:.1f} us, {t_ref / t:.2f}x, {bw:.2f}x bw", ">= 1.0x and >= 0.7x bw",
                        t_ref >= t and bw >= 0.7, check, ok))
        xg = torch.randn(num_rows, 4 * hidden, device=dev, dtype=dt)
        bg = torch.randn(4 * hidden, device=dev, dtype=dt)
        check, ok = _check(bias_gelu_triton(xg, bg), bias_gelu_torch(xg, bg))
        t = setup.time_us(lambda xg=xg, bg=bg: bias_gelu_triton(xg, bg))
        t_ref = setup.time_us(lambda xg=xg, bg=bg: bias_gelu_torch(xg, bg))
        rows.append(Row("bias + GELU(tanh)", model, f"{num_rows}x{4 * hidden}", "vs torch; copy bw",
                        f"{t:.1f} us, {t_ref / t:.2f}x, {2 * xg.nbytes / t / 1e3 / setup.copy_gbps:.2f}x bw",
                        check=check, check_ok=ok))
    return rows


def print_table(setup: Setup, header: list[str], rows: list[Row]) -> None:
    print("\n".join(header))
    print("| kernel | model | shape | measure | result | goal | met | check |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        met = "-" if r.met is None or setup.dry else ("yes" if r.met else "NO")
        check = r.check if r.check_ok else f"FAILED ({r.check})"
        print(f"| {r.kernel} | {r.model} | {r.shape} | {r.measure} | {r.result} | {r.goal} | {met} | {check} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # NOTE: before the first import of a kernels.triton_* module
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run")
    device = torch.device("cpu" if args.dry_run else "cuda")
    setup = Setup(device, torch.bfloat16, args.dry_run, warmup=1 if args.dry_run else 10, reps=2 if args.dry_run else 50)
    t0 = time.time()
    torch.manual_seed(0)
    setup.copy_gbps, mm_tflops = bench_copy_and_matmul(setup)
    # (n_embd, n_layer, n_head, vocab_size)
    models = {"tiny": (128, 2, 2, 256)} if args.dry_run else {"gpt2": (768, 12, 12, 50257),
                                                               "gpt2-xl": (1600, 48, 25, 50257)}
    rows: list[Row] = []
    for name, (n_embd, n_layer, n_head, vocab) in models.items():
        parts = [(bench_prefill, n_head), (bench_decode, n_head),
                 (bench_decode_step, (n_embd, n_layer, n_head, vocab)), (bench_pointwise, n_embd)]
        for part, arg in parts:
            try:
                rows.extend(part(setup, name, arg))
            except Exception as e:  # noqa: BLE001 (one broken part must not hide the others' rows)
                rows.append(Row(f"error in {part.__name__}", name, "-", "-", "-",
                                check=f"{type(e).__name__}: {str(e)[:300]}", check_ok=False))
            if setup.cuda:
                torch.cuda.empty_cache()
    dev_name = torch.cuda.get_device_name() if setup.cuda else "CPU, Triton interpreter (dry run: times mean nothing)"
    header = [f"device: {dev_name}; dtype bf16; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
              f"copy bandwidth {setup.copy_gbps:.4g} GB/s, matmul {mm_tflops:.4g} TFLOP/s, run {time.time() - t0:.0f} s"]
    print_table(setup, header, rows)
    failed = [r for r in rows if not r.check_ok]
    print(f"checks: {len(rows) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
