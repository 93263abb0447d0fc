"""Constrained-decoding overhead: decode steps of a batch of 32 where half the rows follow a JSON schema,
against the same batch unconstrained, alternately in one run.

    python benchmarks/structured.py --threads 2            # GPT-2 small shape (50,257-token vocab), random weights

Steps are timed with the engine (mask fill for the constrained rows, mask applied before sampling, the
matchers advanced); compiling the schema is done once before, and timed separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SHAPES, add_threads_flag, apply_threads  # noqa: E402
from lmservice.engine.engine import Engine, EngineConfig  # noqa: E402
from lmservice.engine.sampling_params import SamplingParams  # noqa: E402
from lmservice.model.loader import load_model  # noqa: E402
from lmservice.serving.structured import GrammarCompiler, StructuredSpec  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 8},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"]}}, "required": ["name", "age", "tags", "address"]}


def step_times(engine: Engine, batch: int, constrained: int, template, steps: int) -> list[float]:
    prompts = torch.randint(0, engine.vocab_size - 1, (batch, 64), generator=torch.Generator().manual_seed(0))
    for i, p in enumerate(prompts.tolist()):
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=steps + 4, ignore_eos=True)
        engine.submit(str(i), p, params, grammar=template if i < constrained else None)
    engine.step()  # the prefills
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for i in range(batch):
        engine.abort(str(i))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2", choices=["gpt2", "tiny"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    add_threads_flag(ap)
    args = ap.parse_args()
    apply_threads(args)
    from tests.helpers import make_gpt2_dir

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_gpt2_dir(Path(tmp) / "model", seed=0, **SHAPES[args.shape])
        engine = Engine(load_model(model_dir, "cpu", "float32"),
                        EngineConfig.from_fields(kv_cache_memory_mb=512, enable_prefix_caching=False))
        compiler = GrammarCompiler(engine.tokenizer, engine.vocab_size)
        start = time.perf_counter()
        template = compiler.compile(StructuredSpec("json", json.dumps(SCHEMA), "bench"))
        compile_s = time.perf_counter() - start  # includes building llguidance's tokenizer (once per server)
        start = time.perf_counter()
        compiler.compile(StructuredSpec("json", json.dumps({**SCHEMA, "title": "another"}), "bench"))
        second_s = time.perf_counter() - start
        free, half = [], []
        for _ in range(args.repeats):
            free.append(statistics.median(step_times(engine, args.batch, 0, None, args.steps)))
            half.append(statistics.median(step_times(engine, args.batch, args.batch // 2, template, args.steps)))
    f, h = min(free) * 1e3, min(half) * 1e3
    print(f"vocab {SHAPES[args.shape]['vocab_size']}, threads {torch.get_num_threads()}: first compile "
          f"{compile_s:.2f} s (with the tokenizer), a second schema {second_s * 1e3:.0f} ms\n")
    print("| batch | constrained rows | ms/step | overhead |")
    print("| ---: | ---: | ---: | ---: |")
    print(f"| {args.batch} | 0 | {f:.1f} | |")
    print(f"| {args.batch} | {args.batch // 2} (JSON schema) | {h:.1f} | {h / f - 1:+.1%} |")


if __name__ == "__main__":
    main()
