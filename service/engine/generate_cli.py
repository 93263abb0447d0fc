"""`lmservice generate`: run prompts through the engine on the command line, no server."""

from __future__ import annotations

import argparse
import sys

from service.config import Settings
from service.engine.async_engine import engine_config
from service.engine.engine import Engine
from service.engine.sampling_params import SamplingParams
from service.model.loader import load_model


def run(settings: Settings, args: argparse.Namespace) -> int:
    loaded = load_model(settings.model, settings.device, settings.dtype)
    engine = Engine(loaded, engine_config(settings))
    params = SamplingParams(
        n=args.n, max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, seed=args.sample_seed,
        stop=args.stop, ignore_eos=args.ignore_eos, logprobs=args.logprobs)
    tok = loaded.tokenizer
    for i, prompt in enumerate(args.prompt):
        engine.add_request(str(i), tok.encode(prompt), params)
    stream = args.stream and len(args.prompt) == 1 and args.n == 1
    texts: dict[tuple[str, int], str] = {}
    logprobs: dict[tuple[str, int], list] = {}
    if stream:
        sys.stdout.write(args.prompt[0])
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.outputs:
                key = (out.request_id, c.index)
                texts[key] = texts.get(key, "") + c.text
                logprobs.setdefault(key, []).extend(c.logprobs or [])
                if stream:
                    sys.stdout.write(c.text)
                    sys.stdout.flush()
    if stream:
        sys.stdout.write("\n")
    for (rid, index), text in sorted(texts.items()):
        if not stream:
            header = f"--- prompt {rid}" + (f", completion {index}" if args.n > 1 else "") + " ---"
            print(f"{header}\n{args.prompt[int(rid)]}{text}")
        if args.logprobs is not None:
            for lp in logprobs[(rid, index)]:
                top = ", ".join(f"{tok.decode([t])!r}: {v:.3f}" for t, v in lp.top)
                print(f"  {tok.decode([lp.token_id])!r} {lp.logprob:.3f}  [{top}]")
    return 0
