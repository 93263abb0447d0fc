"""Where a decode step's time goes: torch.profiler over engine steps, ops grouped by what they do.

A GPT-2-small-shaped model with random weights, `--batch` requests of --prompt-len tokens
prefilled first, then --steps decode steps profiled. Printed per dtype and batch: wall
time per step and the share of each group (self CPU time of its ops); "Python and
scheduling" is the wall time no op accounts for (the engine's own bookkeeping).

    python benchmarks/profile_step.py --threads 2 --dtypes float32 int8 --batch 1 32 [--cpu-kernels torch native]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SHAPES, add_threads_flag, apply_threads  # noqa: E402
from benchmarks.engine import load, make_model  # noqa: E402
from lmservice.engine.engine import Engine, EngineConfig  # noqa: E402
from lmservice.engine.sampling_params import SamplingParams  # noqa: E402

# first match wins; an op's self time goes to its group
GROUPS = [
    ("decode step in C (all layers)", ("gpt2_decode_step",)),
    ("linears", ("addmm", "aten::mm", "linear_few_rows", "aten::linear", "quantized::", "_weight_int8pack_mm", "aten::bmm", "_linear_pointwise",
                 "quantize_per_tensor", "aten::_linear")),
    ("KV gather + write", ("index_select", "aten::index", "index_fill", "index_put", "index_copy", "aten::copy_")),
    ("attention (SDPA or native)", ("scaled_dot_product", "_flash_attention", "_scaled_dot", "paged_decode_attention")),
    ("layer norm, GELU, residual", ("layer_norm", "gelu", "aten::add", "aten::tanh", "aten::mul")),
    ("sampling", ("argmax", "softmax", "topk", "sort", "exponential", "aten::where", "isfinite", "aten::all")),
]


def group_of(name: str) -> str:
    for group, needles in GROUPS:
        if any(n in name for n in needles):
            return group
    return "other ops (tensor building, embeddings)"


def profile_steps(model_dir: Path, dtype: str, batch: int, prompt_len: int, steps: int, vocab: int,
                  cpu_kernels: str = "auto") -> tuple[float, dict]:
    loaded = load(model_dir, dtype)
    engine = Engine(loaded, EngineConfig.from_fields(kv_cache_memory_mb=1024, max_num_batched_tokens=8192,
                                                     enable_prefix_caching=False, cpu_kernels=cpu_kernels))
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for i, p in enumerate(torch.randint(0, vocab - 1, (batch, prompt_len), generator=g).tolist()):
        engine.submit(str(i), p, params)
    engine.step()  # the whole prefill
    for _ in range(3):  # warm-up decode steps
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - start) / steps * 1e3
    shares: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith(("aten::", "quantized::", "_")) or "::" in evt.key:
            shares[group_of(evt.key)] += evt.self_cpu_time_total / 1e3 / steps
    shares["Python and scheduling"] = max(0.0, wall - sum(shares.values()))
    return wall, shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2", choices=["gpt2", "tiny"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "int8"])
    ap.add_argument("--cpu-kernels", nargs="+", default=["auto"], choices=["auto", "torch", "native"],
                    help="engine cpu_kernels setting(s), side by side: torch runs no C code, native the C kernels")
    add_threads_flag(ap)
    args = ap.parse_args()
    apply_threads(args)
    names = [g for g, _ in GROUPS] + ["other ops (tensor building, embeddings)", "Python and scheduling"]
    print("| dtype | batch | cpu kernels | ms/step | " + " | ".join(names) + " |")
    print("| --- | --- | ---: | ---: |" + " ---: |" * len(names))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        make_model(model_dir, args.shape)
        for dtype in args.dtypes:
            for batch in args.batch:
                for cpu_kernels in args.cpu_kernels:
                    wall, shares = profile_steps(model_dir, dtype, batch, args.prompt_len, args.steps,
                                                 SHAPES[args.shape]["vocab_size"], cpu_kernels)
                    cells = " | ".join(f"{shares.get(n, 0.0):.1f} ({shares.get(n, 0.0) / wall:.0%})" for n in names)
                    print(f"| {dtype} | {batch} | {cpu_kernels} | {wall:.1f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
