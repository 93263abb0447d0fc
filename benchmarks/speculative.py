"""Speculative decoding on and off, side by side in one run: generated tokens/s and inter-token latency.

Closed loop in process (the engine, no HTTP): at most `c` requests in flight, each replaced when it finishes,
greedy. For each concurrency the plain engine and the speculating one alternate, `--rounds` times each, in
reversed order every other round. Workloads:

- `grounded`: the shipped base (models/base) continues a passage it was shown: the prompt is a TinyStories
  validation paragraph followed by its first 24 tokens again, so the continuation can copy from the prompt
  (what editing, extraction or summarising with quotes looks like to an n-gram proposer);
- `stories`: the shipped base continues the first 128 tokens of a paragraph (nothing planted to copy);
- `random`: a GPT-2-small-shaped random-weight model, 128 random prompt tokens, 128 new tokens (the plain
  workload of benchmarks/engine.py and serve.py, where guesses are almost never right).

    python benchmarks/speculative.py                           # every workload, c = 1 8 32
    python benchmarks/speculative.py --workloads grounded --concurrency 1 --spec "draft:models/base"
    python benchmarks/speculative.py --workloads random --concurrency 8 16 --disable-batch-size 64  # threshold

Prints one row per (workload, c): tokens/s and mean ITL off and on, their ratio, and the acceptance rate.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import SHAPES, add_threads_flag, apply_threads, closed_loop  # noqa: E402
from lmservice.engine.engine import Engine, EngineConfig  # noqa: E402
from lmservice.engine.sampling_params import SamplingParams  # noqa: E402
from lmservice.model.loader import load_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "tinystories" / "valid.txt"


def paragraphs(min_chars: int = 400) -> list[str]:
    return [p.strip() for p in DATA.read_text().split("\n\n") if len(p.strip()) >= min_chars]


def workload(name: str, tokenizer, vocab: int, num: int) -> tuple[list[list[int]], int]:
    """(prompts, new tokens) of a workload."""
    if name == "random":
        rng = random.Random(0)
        return [[rng.randrange(vocab) for _ in range(128)] for _ in range(num)], 128
    texts = paragraphs()
    out = []
    for text in texts[:num]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append(ids[:120] + ids[:24] if name == "grounded" else ids[:128])
    return out, 96 if name == "grounded" else 128


def run(loaded, spec: str | None, k: int, disable: int, prompts: list[list[int]], new_tokens: int,
        concurrency: int, ngram_min: int = EngineConfig.speculative_ngram_min) -> tuple[float, float, float | None]:
    """Closed loop: tokens/s, mean ITL in ms (per request: first to last token over the tokens between), and
    the acceptance rate (None without speculation)."""
    engine = Engine(loaded, EngineConfig.from_fields(speculative=spec, num_speculative_tokens=k,
                                                     speculative_disable_batch_size=disable,
                                                     speculative_ngram_min=ngram_min,
                                                     speculative_ngram_max=max(4, ngram_min)))
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    engine.submit("warmup", prompts[0][:16], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    tok_s, itl_ms = closed_loop(engine, prompts, params, concurrency)
    stats = engine.stats().spec
    rate = stats.num_accepted_tokens / stats.num_draft_tokens if stats and stats.num_draft_tokens else None
    return tok_s, itl_ms, rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["grounded", "stories", "random"],
                    choices=["grounded", "stories", "random"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-slot", type=int, default=2, help="requests = max(4, this x c)")
    ap.add_argument("--spec", default="ngram", help="--speculative value: ngram or draft:DIR")
    ap.add_argument("--k", type=int, default=EngineConfig.num_speculative_tokens, help="--num-speculative-tokens")
    ap.add_argument("--ngram-min", type=int, default=EngineConfig.speculative_ngram_min)
    ap.add_argument("--disable-batch-size", type=int, default=EngineConfig.speculative_disable_batch_size)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--base", type=Path, default=ROOT / "models" / "base")
    add_threads_flag(ap)
    args = ap.parse_args()
    apply_threads(args)

    print(f"speculative={args.spec} k={args.k} ngram-min={args.ngram_min} disable above {args.disable_batch_size} decoding sequences")
    print("| workload | c | tok/s off | tok/s on | on/off | ITL ms off | ITL ms on | accepted |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads:
            if name == "random":
                from tests.helpers import make_gpt2_dir

                model_dir = make_gpt2_dir(Path(tmp) / "gpt2", seed=0, **SHAPES["gpt2"])
            else:
                model_dir = args.base
            loaded = load_model(model_dir, "cpu", "float32")
            for c in args.concurrency:
                prompts, new_tokens = workload(name, loaded.tokenizer, loaded.config.vocab_size,
                                               max(4, args.requests_per_slot * c))
                results: dict[bool, list[tuple[float, float, float | None]]] = {False: [], True: []}
                for r in range(args.rounds):
                    for on in ((False, True) if r % 2 == 0 else (True, False)):
                        results[on].append(run(loaded, args.spec if on else None, args.k, args.disable_batch_size,
                                               prompts, new_tokens, c, args.ngram_min))
                off = [sum(x[i] for x in results[False]) / args.rounds for i in range(2)]
                on = [sum(x[i] for x in results[True]) / args.rounds for i in range(2)]
                rates = [x[2] for x in results[True] if x[2] is not None]
                rate = f"{100 * sum(rates) / len(rates):.0f}%" if rates else "-"
                print(f"| {name} | {c} | {off[0]:.1f} | {on[0]:.1f} | {on[0] / off[0]:.2f} | {off[1]:.1f} | "
                      f"{on[1]:.1f} | {rate} |", flush=True)


if __name__ == "__main__":
    main()
