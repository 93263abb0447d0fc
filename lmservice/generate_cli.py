"""`lmservice generate`: run prompts through the engine on the command line, no server."""

from __future__ import annotations

import argparse
import sys

from lmservice.config import Settings
from lmservice.serving.bootstrap import build_engine
from lmservice.serving.sampling import sampling_params


def run(settings: Settings, args: argparse.Namespace) -> int:
    engine = build_engine(settings)
    # The same mapping as the API's: the flags carry the request fields' names (--sample-seed is `seed`;
    # --seed is the server's own).
    params = sampling_params({**vars(args), "seed": args.sample_seed}, default_max_tokens=args.max_tokens,
                             n=args.n, logprobs=args.logprobs, num_beams=args.num_beams)
    tok = engine.tokenizer
    for i, prompt in enumerate(args.prompt):
        engine.submit(str(i), tok.encode(prompt), params)
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
