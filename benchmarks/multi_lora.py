"""Decode throughput with many LoRA adapters in one batch vs merged models one adapter at a time.

A GPT-2-small-shaped base with random weights; --concurrency requests (prompt
--prompt-len tokens, --new-tokens each, greedy, ignore_eos). For k distinct
rank-8 adapters (all four projections), requests are spread round-robin over
them and run:
  - lmservice multi-LoRA: one engine, all adapters loaded, all requests at once;
  - merged one-at-a-time: for each adapter, a model with that adapter merged
    into its weights, serving only that adapter's requests (what a server without
    multi-LoRA batching has to do);
and the base with no adapter is the reference row (k = 0).

    python benchmarks/multi_lora.py                               # the table in docs/benchmarks.md
    python benchmarks/multi_lora.py --shape tiny --adapters 0 1 4  # a quick check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SHAPES, add_threads_flag, apply_threads  # noqa: E402
from lmservice.engine.engine import Engine, EngineConfig  # noqa: E402
from lmservice.engine.sampling_params import SamplingParams  # noqa: E402
from lmservice.model.loader import load_model  # noqa: E402
from lmservice.model.lora import LoRATargets, load_lora_adapter  # noqa: E402

MODULES = {"attn.c_attn": (1, 3), "attn.c_proj": (1, 1), "mlp.c_fc": (1, 4), "mlp.c_proj": (4, 1)}  # (in, out) x n_embd


def write_adapter(path: Path, shape: dict, rank: int, seed: int) -> None:
    """A PEFT-format LoRA directory with random A and B (rank `rank`, alpha 2 * rank)."""
    g = torch.Generator().manual_seed(seed)
    e = shape["n_embd"]
    tensors = {}
    for layer in range(shape["n_layer"]):
        for module, (fin, fout) in MODULES.items():
            prefix = f"base_model.model.transformer.h.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fin * e, generator=g) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fout * e, rank, generator=g) * 0.02
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "fan_in_fan_out": True, "bias": "none",
        "target_modules": ["c_attn", "c_proj", "c_fc"], "base_model_name_or_path": "base"}))


def run(engine: Engine, requests: list[tuple[list[int], str | None]], new_tokens: int) -> tuple[int, float]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, (prompt, adapter) in enumerate(requests):
        engine.submit(str(i), prompt, params, adapter=adapter)
    generated = 0
    while engine.has_unfinished():
        generated += sum(len(c.token_ids) for out in engine.step() for c in out.outputs)
    return generated, time.perf_counter() - start


def merged_engine(base: Path, adapter_dir: Path, config: EngineConfig) -> Engine:
    loaded = load_model(base, "cpu", "float32")
    adapter = load_lora_adapter(adapter_dir, LoRATargets.from_config(loaded.config), 64)
    modules = dict(loaded.model.named_modules())
    with torch.no_grad():
        for key, (a, b) in adapter.weights.items():  # key: h.{i}.attn.c_attn; B carries the scaling
            modules[f"transformer.{key}"].weight += b @ a  # (out, in)
    return Engine(loaded, config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2", choices=list(SHAPES))
    ap.add_argument("--adapters", type=int, nargs="+", default=[0, 1, 4, 8, 32])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    add_threads_flag(ap)
    args = ap.parse_args()
    apply_threads(args)
    from tests.helpers import make_gpt2_dir

    shape = SHAPES[args.shape]
    config = EngineConfig.from_fields(kv_cache_memory_mb=256, max_num_seqs=256, max_loras=max(max(args.adapters), 1),
                          enable_prefix_caching=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = make_gpt2_dir(Path(tmp) / "base", seed=0, **shape)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, shape["vocab_size"] - 1, (args.concurrency, args.prompt_len), generator=g).tolist()
        dirs = {}
        for i in range(max(args.adapters)):
            dirs[f"a{i}"] = Path(tmp) / f"a{i}"
            write_adapter(dirs[f"a{i}"], shape, args.rank, seed=i)
        engine = Engine(load_model(base, "cpu", "float32"), config)
        for name, path in dirs.items():
            engine.add_adapter(name, path)
        run(engine, [(p, None) for p in prompts], 8)  # warm-up: allocator, threads, caches
        base_rate = None
        for k in args.adapters:
            names = [None] * args.concurrency if k == 0 else [f"a{i % k}" for i in range(args.concurrency)]
            n, t = run(engine, list(zip(prompts, names, strict=True)), args.new_tokens)
            multi = n / t
            base_rate = base_rate or (multi if k == 0 else None)
            merged = float("nan")
            if k > 0:
                total_n, total_t = 0, 0.0
                for j in range(k):
                    group = [(p, None) for p, name in zip(prompts, names, strict=True) if name == f"a{j}"]
                    m_engine = merged_engine(base, dirs[f"a{j}"], config)
                    n_j, t_j = run(m_engine, group, args.new_tokens)
                    total_n, total_t = total_n + n_j, total_t + t_j
                merged = total_n / total_t
            rows.append((k, multi, merged))
            print(f"k={k}: multi-LoRA {multi:.1f} tok/s, merged one-at-a-time {merged:.1f} tok/s", flush=True)

    print("\n| distinct adapters | lmservice multi-LoRA tok/s | vs base only | merged, one adapter at a time tok/s "
          "| multi-LoRA vs merged |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for k, multi, merged in rows:
        vs_base = multi / base_rate if base_rate else float("nan")
        print(f"| {k} | {multi:.1f} | {vs_base:.2f}x | {merged:.1f} | {multi / merged:.2f}x |")


if __name__ == "__main__":
    main()
