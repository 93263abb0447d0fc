"""How far a one-sequence decode step is from the memory floor: the step against a timed read of its bytes.

At one sequence a decode step is bound by reading the weights (and the KV cache) once. This script counts
the bytes a step of a GPT-2-small-shaped random model must read in each weight format (projections, LM head,
the K/V of a --context-token sequence; embeddings read one row, LayerNorms and biases are noise), times
reading the same number of bytes with the same threads (`torch.sum` over a buffer of that size: a streaming,
vectorised read, the best a step could do), and times the engine's decode step at one sequence (median of
--steps, best of --repeats, the two measurements alternated). The gap between them is per-step work other
than reading: the C step's arithmetic, the LM head's, sampling and the engine's bookkeeping.

    python benchmarks/read_floor.py --threads 2                       # fp32, int8, int4 weights
    python benchmarks/read_floor.py --threads 2 --dtypes float32 --kv-cache-dtype int8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SHAPES, add_threads_flag, apply_threads  # noqa: E402
from benchmarks.engine import load, make_model  # noqa: E402
from lmservice.engine.engine import Engine, EngineConfig  # noqa: E402
from lmservice.engine.sampling_params import SamplingParams  # noqa: E402

# bytes per weight and the per-32-weight scale overhead of each format (the LM head of int4 is int8)
WEIGHT_BYTES = {"float32": (4.0, 4.0), "int8": (1.0, 1.0), "int4": (0.5 + 2 / 32, 1.0)}
KV_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0 + 4 / 64}  # int8: a 4-byte scale per head of 64


def step_bytes(shape: dict, dtype: str, kv: str, context: int) -> int:
    c, layers, vocab = shape["n_embd"], shape["n_layer"], shape["vocab_size"]
    proj, head = WEIGHT_BYTES[dtype]
    per_layer = (3 * c * c + c * c + 4 * c * c + 4 * c * c) * proj  # c_attn, attn c_proj, c_fc, mlp c_proj
    kv_bytes = 2 * layers * context * c * KV_BYTES[kv]
    return int(layers * per_layer + vocab * c * head + kv_bytes)


def read_ms(num_bytes: int, repeats: int) -> float:
    """Best time to stream `num_bytes` through the cores once (a fresh buffer larger than any cache)."""
    buf = torch.ones(num_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def step_ms(model_dir: Path, dtype: str, kv: str, context: int, steps: int) -> float:
    engine = Engine(load(model_dir, dtype), EngineConfig.from_fields(kv_cache_memory_mb=512, kv_cache_dtype=kv,
                                                                     enable_prefix_caching=False))
    engine.submit("a", list(range(1, context + 1)), SamplingParams(temperature=0.0, max_tokens=steps + 2,
                                                                   ignore_eos=True))
    engine.step()  # the prefill
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2", choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "int8", "int4"], choices=list(WEIGHT_BYTES))
    ap.add_argument("--kv-cache-dtype", default="fp32", choices=list(KV_BYTES))
    ap.add_argument("--context", type=int, default=192, help="tokens in the sequence's KV cache")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    add_threads_flag(ap)
    args = ap.parse_args()
    apply_threads(args)
    shape = SHAPES[args.shape]
    print(f"threads={torch.get_num_threads()} kv={args.kv_cache_dtype} context={args.context}")
    print("| weights | bytes per step | read floor ms | step ms | step / floor | floor tok/s | step tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / args.shape
        make_model(model_dir, args.shape)
        for dtype in args.dtypes:
            num_bytes = step_bytes(shape, dtype, args.kv_cache_dtype, args.context)
            floors, steps = [], []
            for _ in range(args.repeats):  # alternated, so both see the same machine
                floors.append(read_ms(num_bytes, 5))
                steps.append(step_ms(model_dir, dtype, args.kv_cache_dtype, args.context, args.steps))
            floor, step = min(floors), min(steps)
            print(f"| {dtype} | {num_bytes / 2**20:.2f} MiB | {floor:.2f} | {step:.2f} | {step / floor:.2f} | "
                  f"{1e3 / floor:.0f} | {1e3 / step:.0f} |", flush=True)


if __name__ == "__main__":
    main()
