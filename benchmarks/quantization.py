"""--quantization int8 against fp32 on the shipped base model: greedy agreement and perplexity.

    python benchmarks/quantization.py              # 16 TinyStories valid prompts x 64 greedy tokens; perplexity
                                                   # of the first --ppl-tokens tokens of the valid split
    python benchmarks/quantization.py --max-num-seqs 1   # greedy one request at a time: decode steps of one
                                                   # row, which take the native int8 kernel (per-row scales)

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
from tests.helpers import run_to_completion  # noqa: E402

VALID = ROOT.parent / "shared" / "data" / "tinystories" / "valid.txt"


def engine_for(model_dir: Path, quantization: str, max_num_seqs: int) -> Engine:
    return Engine(load_model(model_dir, "cpu", "float32", quantization=quantization),
                  EngineConfig.from_fields(num_kv_blocks=1024, enable_prefix_caching=False, max_num_seqs=max_num_seqs))


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
    add_threads_flag(ap)
    args = ap.parse_args()
    apply_threads(args)

    # the base model was trained on lowercased TinyStories (models/README.md): evaluate it on the same form
    stories = [s.strip().lower() for s in VALID.read_text().split("\n\n") if s.strip()]
    engines = {q: engine_for(args.model, q, args.max_num_seqs) for q in ("none", "int8")}
    tok = engines["none"].tokenizer
    prompts = [tok.encode(s)[: args.prompt_tokens] for s in stories[: args.prompts]]
    outputs, ppl = {}, {}
    for q, engine in engines.items():
        start = time.perf_counter()
        outputs[q] = greedy(engine, prompts, args.new_tokens)
        ppl[q] = perplexity(engine, tok.encode("\n\n".join(stories))[: args.ppl_tokens], engine.max_model_len)
        print(f"{q}: {time.perf_counter() - start:.1f} s", flush=True)
    same = sum(a == b for a, b in zip(outputs["none"], outputs["int8"], strict=True))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
                 for a, b in zip(outputs["none"], outputs["int8"], strict=True))
    total = args.prompts * args.new_tokens
    print("\n| metric | fp32 | int8 | int8 vs fp32 |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| greedy sequences identical ({args.prompts} x {args.new_tokens} tokens) | | {same}/{args.prompts} | "
          f"{same / args.prompts:.1%} |")
    print(f"| greedy tokens before the first divergence | | {prefix}/{total} | {prefix / total:.1%} |")
    print(f"| perplexity, TinyStories valid (first {args.ppl_tokens} tokens) | {ppl['none']:.3f} | "
          f"{ppl['int8']:.3f} | {ppl['int8'] / ppl['none'] - 1:+.2%} |")


if __name__ == "__main__":
    main()
