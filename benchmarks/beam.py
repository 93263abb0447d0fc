"""Translation quality and cost of beam search: Multi30k val BLEU / chrF and tokens/s, greedy vs k beams.

The shipped translator (models/base + the models/translate-en-de LoRA adapter) in one in-process engine;
every val sentence is rendered with the adapter's card template and submitted at once (continuous
batching), until EOS or --max-tokens (96, as the training job's evaluation). Text is repaired as the
training job read it (lmservice.train.data.clean_text), and scored with sacrebleu's corpus BLEU (13a) and
chrF against the references. tokens/s counts the returned translations' tokens (EOS included) over the
wall time of the whole run: what a client receives per second; the beams' own work is the `beam rows`
column (rows decoded per returned token).

    python benchmarks/beam.py                            # the table in docs/benchmarks.md
    python benchmarks/beam.py --limit 50 --beams 1 2     # a quick check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_threads_flag, apply_threads  # noqa: E402
from lmservice.engine.engine import Engine, EngineConfig  # noqa: E402
from lmservice.engine.sampling_params import SamplingParams  # noqa: E402
from lmservice.model.loader import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "multi30k"


def translate(engine: Engine, template: str, sources: list[str], params: SamplingParams) -> tuple[list[str], dict]:
    tok = engine.tokenizer
    start = time.perf_counter()
    for i, src in enumerate(sources):
        engine.submit(str(i), tok.encode(template.replace("{text}", src)), params, adapter="translate")
    texts = [""] * len(sources)
    num_tokens = num_rows = steps = 0
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        num_rows += engine.step_samples[-1][1] if engine.step_samples else 0
        for out in outs:
            for delta in out.outputs:
                if delta.index == 0:
                    texts[int(out.request_id)] += delta.text
                    num_tokens += len(delta.token_ids)
    wall = time.perf_counter() - start
    return [t.strip() for t in texts], {"wall_s": wall, "tokens": num_tokens, "rows": num_rows, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=ROOT / "models" / "base")
    ap.add_argument("--adapter", type=Path, default=ROOT / "models" / "translate-en-de")
    ap.add_argument("--src", type=Path, default=DATA / "val.en")
    ap.add_argument("--ref", type=Path, default=DATA / "val.de")
    ap.add_argument("--beams", type=int, nargs="+", default=[1, 2, 4, 5], help="1: greedy")
    ap.add_argument("--length-penalty", type=float, default=1.0)
    ap.add_argument("--early-stopping", default="false", choices=["true", "false", "never"])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--limit", type=int, default=0, help="first N sentences only (0: all)")
    ap.add_argument("--hyps", type=Path, default=None, help="write each run's translations to DIR/beams<k>.txt")
    add_threads_flag(ap)
    args = ap.parse_args()
    apply_threads(args)

    import sacrebleu

    from lmservice.model.card import ModelCard
    from lmservice.train.data import clean_text

    sources = [clean_text(line.rstrip("\n")) for line in args.src.open(encoding="utf-8")]
    refs = [clean_text(line.rstrip("\n")) for line in args.ref.open(encoding="utf-8")]
    if args.limit:
        sources, refs = sources[:args.limit], refs[:args.limit]
    template = ModelCard.load(args.adapter).prompt_template
    early_stopping = {"true": True, "false": False}.get(args.early_stopping, args.early_stopping)
    loaded = load_model(args.base, "cpu", "float32")
    print(f"{len(sources)} sentences of {args.src}; length_penalty {args.length_penalty}, early_stopping "
          f"{args.early_stopping}, max_tokens {args.max_tokens}, torch threads {__import__('torch').get_num_threads()}")
    print("\n| beams | BLEU | chrF | tokens | wall s | tokens/s | sentences/s | beam rows per token |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in args.beams:
        engine = Engine(loaded, EngineConfig.from_fields(kv_cache_memory_mb=1024, max_num_seqs=256,
                                                         max_num_batched_tokens=4096))
        engine.add_adapter("translate", args.adapter)
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, num_beams=k,
                                **({"length_penalty": args.length_penalty, "early_stopping": early_stopping}
                                   if k > 1 else {}))
        hyps, cost = translate(engine, template, sources, params)
        if args.hyps is not None:
            args.hyps.mkdir(parents=True, exist_ok=True)
            (args.hyps / f"beams{k}.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        bleu = sacrebleu.metrics.BLEU().corpus_score(hyps, [refs]).score
        chrf = sacrebleu.metrics.CHRF().corpus_score(hyps, [refs]).score
        print(f"| {k} | {bleu:.2f} | {chrf:.2f} | {cost['tokens']} | {cost['wall_s']:.1f} | "
              f"{cost['tokens'] / cost['wall_s']:.0f} | {len(sources) / cost['wall_s']:.1f} | "
              f"{cost['rows'] / cost['tokens']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
