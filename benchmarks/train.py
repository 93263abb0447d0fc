"""Training throughput: `lmservice train pretrain` against a bare PyTorch loop on the same model and batch.

The model is the shipped base's architecture (models/base/config.json: 6 x 256 GPT-2, context 256),
batches of --batch-size x 256 tokens, AdamW. The bare loop is forward, backward, clip, step, zero_grad
on random token blocks (in process); the job is the real command on TinyStories (a subprocess, with no
evaluation and no checkpoint in the timed steps), its tokens/s read from its last log line (the last third
of the steps; the bare loop times all of its steps after two warm-up ones). Both run
fp32 and with bf16 autocast (`--bf16`), alternately.

    python benchmarks/train.py --threads 2 --steps 30
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "tinystories" / "train_first5000_lowercased.txt"


def bare_loop(steps: int, batch_size: int, bf16: bool, threads: int) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = GPT2Config.from_pretrained(ROOT / "models" / "base")
    model = GPT2LMHeadModel(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    block = config.n_positions
    batches = [torch.randint(0, config.vocab_size, (batch_size, block)) for _ in range(4)]

    def step(i: int) -> None:
        ids = batches[i % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(2):  # warm-up
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch_size * block / (time.perf_counter() - start)


def job(steps: int, batch_size: int, bf16: bool, threads: int, workdir: Path) -> float:
    out = workdir / f"job-{'bf16' if bf16 else 'fp32'}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "lmservice.cli", "train", "pretrain", "--tokenizer", str(ROOT / "models" / "base"),
           "--train", str(DATA), "--output", str(out), "--sample-by", "line", "--preset", "mini", "--n-layer", "6",
           "--n-positions", "256", "--max-steps", str(steps), "--batch-size", str(batch_size), "--lr", "1e-3",
           "--weight-decay", "0.1", "--logging-steps", str(max(1, steps // 3)), "--save-steps", str(10 * steps),
           "--eval-fraction", "0.01", "--max-eval-examples", "8", "--threads", str(threads), "--no-progress"] + (["--bf16"] if bf16 else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    rates = re.findall(r"tok_s=(\d+)", proc.stdout)
    if not rates:
        raise RuntimeError(f"no tok_s in the job's output:\n{proc.stdout[-2000:]}")
    return float(rates[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = ap.parse_args()
    print("| precision | bare loop tok/s | job tok/s | job / bare |")
    print("| --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            bf16 = mode == "bf16"
            bare = max(bare_loop(args.steps, args.batch_size, bf16, args.threads) for _ in range(args.repeats))
            ours = max(job(args.steps, args.batch_size, bf16, args.threads, Path(tmp)) for _ in range(args.repeats))
            print(f"| {mode} | {bare:.0f} | {ours:.0f} | {ours / bare:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
