"""End to end: `lmservice serve` on the device against transformers' generate in static batches on the same device.

The workload of docs/benchmarks.md's CPU table (benchmarks/serve.py): prompts of 128 random token ids,
128 new tokens, greedy, ignore_eos, streamed over /v1/completions, at concurrency 1, 32 and 256 (2 x c
requests per level, at most c in flight), on a GPT-2-small-shaped random-weight model in bf16. One
unrecorded level first warms the server (Triton autotuning, first-call costs). transformers runs the same
prompts as static batches of c: its time to first token is the batch's prefill plus one token.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time

import torch

from benchmarks.gpu.common import Step


def _serve(step: Step, levels: list[int], prompt_len: int, new_tokens: int) -> tuple[list[dict], object]:
    from benchmarks.serve import launch_lmservice, run_level

    shape = "tiny" if step.dry else "gpt2"
    extra = ["--device", step.device.type, "--dtype", "bfloat16" if step.cuda else "float32", "--max-num-seqs",
             str(max(levels)), "--kv-cache-memory-mb", "8192" if step.cuda else "256", "--log-level", "warning"]
    vocab = 999 if step.dry else 50000
    start = time.perf_counter()
    proc, base_url = launch_lmservice(shape, step.workdir, extra)
    step.metrics["server_ready_s"] = round(time.perf_counter() - start, 1)
    rows = []
    try:
        warm = min(32, max(levels))
        asyncio.run(run_level(base_url, "none", "base", warm, warm, prompt_len, 4 if step.dry else 16, vocab,
                              seed=99))  # warm-up, not recorded
        for c in levels:
            rows.append(asyncio.run(run_level(base_url, "none", "base", c, max(4, 2 * c), prompt_len, new_tokens,
                                              vocab, seed=0)))
            print(f"lmservice c={c}: {rows[-1]['throughput']:.0f} tok/s", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except Exception:  # noqa: BLE001 (a server that will not stop must not hide the figures)
            proc.kill()
        if (step.workdir / "server.log").exists():
            shutil.copy(step.workdir / "server.log", step.logdir / f"{step.name}_server.log")
    step.check("the server stopped cleanly on SIGTERM", proc.returncode == 0, f"exit status {proc.returncode}")
    return rows, step.workdir / "model"


def _hf_static(step: Step, model_dir, c: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """transformers' generate on one static batch of c prompts: (tokens/s, seconds to the first token)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.bfloat16 if step.cuda else torch.float32)
    model = model.to(step.device).eval()
    vocab = model.config.vocab_size - 1
    ids = torch.randint(0, vocab, (c, prompt_len), generator=torch.Generator().manual_seed(c)).to(step.device)

    def generate(n: int) -> float:
        step.sync()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        step.sync()
        return time.perf_counter() - start

    generate(2)  # warm-up
    ttft = generate(1)
    return c * new_tokens / generate(new_tokens), ttft


def run(step: Step) -> None:
    levels = [1, 4] if step.dry else [1, 32, 256]
    prompt_len, new_tokens = (16, 8) if step.dry else (128, 128)
    rows, model_dir = _serve(step, levels, prompt_len, new_tokens)
    table = []
    for r in rows:
        c = r["concurrency"]
        step.check(f"c={c}: every token streamed", r["tokens"] == r["requests"] * new_tokens,
                   f"{r['tokens']} of {r['requests'] * new_tokens}")
        hf_rate, hf_ttft = _hf_static(step, model_dir, c, prompt_len, new_tokens)
        step.metrics[f"c{c}"] = {**r, "hf_static_tok_s": hf_rate, "hf_static_ttft_s": hf_ttft}
        table.append([c, f"{r['throughput']:.0f}", f"{r['ttft_p50'] * 1e3:.0f}", f"{r['ttft_p99'] * 1e3:.0f}",
                      f"{r['itl_p50'] * 1e3:.1f}", f"{r['itl_p99'] * 1e3:.1f}", f"{hf_rate:.0f}", f"{hf_ttft * 1e3:.0f}",
                      f"{r['throughput'] / hf_rate:.2f}x"])
    step.table(f"lmservice serve vs transformers generate, {'bf16, ' if step.cuda else ''}{step.device.type}: "
               f"prompt {prompt_len}, {new_tokens} new tokens, greedy, streamed; server ready in "
               f"{step.metrics['server_ready_s']} s",
               ["concurrency", "lmservice tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
                "transformers static batch tok/s", "its TTFT ms", "lmservice vs transformers"], table)
