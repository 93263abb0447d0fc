"""Pieces the benchmark scripts share: model shapes, the torch thread flag, the closed-loop workload."""

from __future__ import annotations

import argparse
import random
import time

import torch

SHAPES = {"gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
          "tiny": dict(vocab_size=1000, n_positions=512, n_embd=64, n_layer=2, n_head=4)}


def add_threads_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for both sides (0: torch's default). On a shared machine 1 avoids "
                         "OpenMP threads spin-waiting on a busy core, which can slow small ops 30x")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def closed_loop_prompt_ids(concurrency: int, prompt_len: int, vocab: int) -> list[list[int]]:
    """The closed-loop workload's prompts at `concurrency`: max(4, 2 x concurrency) prompts of `prompt_len` random
    token ids, seeded by the concurrency. Every engine of a --closed-loop run is fed this one list."""
    rng = random.Random(concurrency)
    return [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(max(4, 2 * concurrency))]


def closed_loop(engine, prompts: list[list[int]], params, concurrency: int) -> tuple[float, float]:
    """Every prompt through `engine`, at most `concurrency` in flight, each replaced as soon as it finishes.
    Returns generated tokens/s and the mean inter-token latency in ms (per request: first to last token over
    the tokens between; several tokens in one step count as arriving together)."""
    queue = list(enumerate(prompts))
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    count: dict[str, int] = {}
    in_flight = generated = 0
    start = time.perf_counter()
    while queue or engine.has_unfinished():
        while queue and in_flight < concurrency:
            i, p = queue.pop(0)
            engine.submit(str(i), p, params)
            in_flight += 1
        for out in engine.step():
            now = time.perf_counter()
            n = sum(len(c.token_ids) for c in out.outputs)
            if n:
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
                count[out.request_id] = count.get(out.request_id, 0) + n
            generated += n
            in_flight -= out.finished
    elapsed = time.perf_counter() - start
    itl = [(last[r] - first[r]) / (count[r] - 1) for r in count if count[r] > 1]
    return generated / elapsed, 1000 * sum(itl) / len(itl) if itl else float("nan")
