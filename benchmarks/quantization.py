"""--quantization int8 and int4, and narrow KV caches, against fp32 on the shipped base model: greedy agreement and
perplexity.

    python benchmarks/quantization.py              # 16 TinyStories valid prompts x 64 greedy tokens; perplexity
                                                   # of the first --ppl-tokens tokens of the valid split
    python benchmarks/quantization.py --quantization int8 int8-blocks int4
                                                   # int8-blocks: the projections in 8-bit blocks of 32 with
                                                   # a scale each (q8_0's layout), not a --quantization choice
    python benchmarks/quantization.py --max-num-seqs 1   # greedy one request at a time: decode steps of one
                                                   # row, which take the native int8 kernel (per-row scales)
    python benchmarks/quantization.py --quantization --kv-cache-dtypes fp16 bf16 int8
                                                   # fp32 weights, each --kv-cache-dtype against an fp32 cache
    python benchmarks/quantization.py --kv-cache-dtypes int8
                                                   # also int8 and int4 weights with an int8 cache (what
                                                   # --kv-cache-dtype auto stores for them)

Agreement is counted two ways: sequences identical to fp32's, and tokens before each sequence's first
divergence (the strict count: after a divergence the two continue from different text).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_threads_flag, apply_threads  # noqa: E402
from lmservice.engine.engine import Engine, EngineConfig  # noqa: E402
from lmservice.engine.sampling_params import SamplingParams  # noqa: E402
from lmservice.model.loader import load_model  # noqa: E402
from lmservice.model.quantize import BlockLinear, Int8Linear  # noqa: E402
from tests.helpers import run_to_completion  # noqa: E402

VALID = ROOT.parent / "shared" / "data" / "tinystories" / "valid.txt"


def engine_for(model_dir: Path, quantization: str, max_num_seqs: int, kv_cache_dtype: str = "auto") -> Engine:
    if quantization == "int8-blocks":  # int4's layout with 8 bits: projections in blocks, the LM head int8
        loaded = load_model(model_dir, "cpu", "float32")
        lm_head = loaded.model.lm_head
        loaded.model.swap_linears(lambda m: Int8Linear(m.weight, m.bias) if m is lm_head else BlockLinear(m.weight, m.bias, 8))
    else:
        loaded = load_model(model_dir, "cpu", "float32", quantization=quantization)
    return Engine(loaded, EngineConfig.from_fields(num_kv_blocks=1024, enable_prefix_caching=False,
                                                   max_num_seqs=max_num_seqs, kv_cache_dtype=kv_cache_dtype))


def greedy(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    out = run_to_completion(engine, [(str(i), p, params) for i, p in enumerate(prompts)])
    return [out[str(i)]["tokens"][0] for i in range(len(prompts))]


def perplexity(engine: Engine, ids: list[int], window: int) -> float:
    """exp(mean NLL) over non-overlapping windows of `window` tokens (each window's first token unscored)."""
    chunks = [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]
    params = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=0)
    out = run_to_completion(engine, [(str(i), c, params) for i, c in enumerate(chunks)])
    nll = [-lp.logprob for i in range(len(chunks)) for lp in out[str(i)]["events"][-1].prompt_logprobs if lp]
    return math.exp(sum(nll) / len(nll))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "base")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ppl-tokens", type=int, default=50_000)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="the engine's batch limit (decode rows per step)")
    ap.add_argument("--as-written", action="store_true", help="the valid stories cased, as written (for a base "
                    "trained on cased text); by default lowercased")
    ap.add_argument("--quantization", nargs="*", default=["int8", "int4"],
                    choices=["int8", "int8-blocks", "int4"])
    ap.add_argument("--kv-cache-dtypes", nargs="*", default=[], choices=["fp16", "bf16", "int8"],
                    help="also fp32 weights over each of these KV caches")
    add_threads_flag(ap)
    args = ap.parse_args()
    apply_threads(args)

    # a base model trained on lowercased TinyStories (models/README.md) is evaluated on the same form
    stories = [s.strip() if args.as_written else s.strip().lower() for s in VALID.read_text().split("\n\n") if s.strip()]
    outputs, ppl = {}, {}
    runs = [("none", "fp32"), *((q, "fp32") for q in args.quantization),
            *((q, kv) for kv in args.kv_cache_dtypes for q in ("none", *args.quantization))]
    for q, kv in runs:
        engine = engine_for(args.model, q, args.max_num_seqs, kv)
        tok = engine.tokenizer
        prompts = [tok.encode(s)[: args.prompt_tokens] for s in stories[: args.prompts]]
        start = time.perf_counter()
        outputs[q, kv] = greedy(engine, prompts, args.new_tokens)
        ppl[q, kv] = perplexity(engine, tok.encode("\n\n".join(stories))[: args.ppl_tokens], engine.max_model_len)
        print(f"{q}, KV {kv}: {time.perf_counter() - start:.1f} s", flush=True)
    total = args.prompts * args.new_tokens
    fp32 = ("none", "fp32")
    print(f"\n{args.prompts} prompts x {args.new_tokens} greedy tokens; perplexity of the first {args.ppl_tokens} "
          f"tokens of TinyStories valid: fp32 {ppl[fp32]:.3f}\n")
    print("| weights | KV cache | greedy sequences identical to fp32 | greedy tokens before the first divergence "
          "| perplexity | vs fp32 |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for run in runs[1:]:
        same = sum(a == b for a, b in zip(outputs[fp32], outputs[run], strict=True))
        prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
                     for a, b in zip(outputs[fp32], outputs[run], strict=True))
        weights = "fp32" if run[0] == "none" else run[0]
        print(f"| {weights} | {run[1]} | {same}/{args.prompts} ({same / args.prompts:.0%}) | {prefix}/{total} "
              f"({prefix / total:.1%}) | {ppl[run]:.3f} | {ppl[run] / ppl[fp32] - 1:+.2%} |")

if __name__ == "__main__":
    main()
