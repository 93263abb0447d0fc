"""Held-out language-model quality of checkpoints that may have different tokenizers.

Per-token perplexity depends on the tokenizer, so two bases with different
vocabularies are compared in bits per byte: total next-token loss (nats) over
blocks of the held-out text, divided by ln 2 and by the UTF-8 bytes those
tokens spell (each EOS counts as the one newline it stands for).

    python scripts/eval_lm.py models/base /work/runs/old-base --text valid.txt --blocks 128
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from lmservice.train.data import load_text
from lmservice.train.examples import pack


def evaluate(model_dir: Path, texts: list[Path], blocks: int, block_size: int) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = GPT2LMHeadModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    size = min(block_size, model.config.n_positions)
    ds = pack(load_text(texts, sample_by="line"), tokenizer, size)
    ds = ds.select(range(min(blocks, len(ds))))
    nats, tokens, nbytes = 0.0, 0, 0
    with torch.inference_mode():
        for i in range(0, len(ds), 16):
            ids = ds[i : i + 16]["input_ids"]
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = ids[:, 1:]
            nats += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
            tokens += target.numel()
            for row in target.tolist():
                text = tokenizer.decode(row, skip_special_tokens=True)
                nbytes += len(text.encode()) + row.count(tokenizer.eos_token_id)
    return {"tokens": tokens, "bytes": nbytes, "perplexity": math.exp(nats / tokens),
            "bits_per_byte": nats / math.log(2) / nbytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--text", type=Path, nargs="+", required=True)
    p.add_argument("--blocks", type=int, default=128)
    p.add_argument("--block-size", type=int, default=256)
    args = p.parse_args()
    for model_dir in args.models:
        r = evaluate(model_dir, args.text, args.blocks, args.block_size)
        print(f"{model_dir}: {r['tokens']} tokens, {r['bytes']} bytes, perplexity {r['perplexity']:.2f}, "
              f"bits/byte {r['bits_per_byte']:.4f}", flush=True)


if __name__ == "__main__":
    main()
