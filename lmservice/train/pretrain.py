"""`lmservice train pretrain`: a GPT-2 from scratch (a config preset + a tokenizer) on plain text.

Text is packed into blocks of `--block-size` tokens (see `examples.pack`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase, default_data_collator

from lmservice.model.card import ModelCard
from lmservice.train.data import DataError, limit, load_text, split_heldout, text_fix_note
from lmservice.train.examples import pack
from lmservice.train.modeling import load_tokenizer
from lmservice.train.options import add_training_arguments
from lmservice.train.runner import Job, run_job, setup

# (n_layer, n_embd, n_head). small..xl are the released GPT-2 shapes.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 2),
    "mini": (4, 256, 4),
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
    "xl": (48, 1600, 25),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", type=Path, required=True, help="Tokenizer dir (from `train tokenizer`).")
    p.add_argument("--train", type=Path, nargs="+", required=True, help="Text files.")
    p.add_argument("--eval", type=Path, nargs="*", default=None, help="Held-out text files.")
    p.add_argument("--sample-by", choices=["line", "paragraph", "document"], default="paragraph")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--n-layer", type=int, default=None, help="Overrides the preset.")
    p.add_argument("--n-embd", type=int, default=None, help="Overrides the preset.")
    p.add_argument("--n-head", type=int, default=None, help="Overrides the preset.")
    p.add_argument("--n-positions", type=int, default=256, help="Context length of the model.")
    p.add_argument("--block-size", type=int, default=None, help="Training sequence length (<= n-positions).")
    p.add_argument("--dropout", type=float, default=0.0)
    add_training_arguments(p, lr=1e-3, lora=False)


def gpt2_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> GPT2Config:
    n_layer, n_embd, n_head = PRESETS[args.preset]
    n_layer = args.n_layer or n_layer
    n_embd = args.n_embd or n_embd
    n_head = args.n_head or n_head
    if n_embd % n_head:
        raise DataError(f"--n-embd {n_embd} is not divisible by --n-head {n_head}")
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def run(args: argparse.Namespace) -> int:
    setup(args)
    tokenizer = load_tokenizer(args.tokenizer)
    config = gpt2_config(args, tokenizer)
    block_size = args.block_size or config.n_positions
    if block_size > config.n_positions:
        raise DataError(f"--block-size {block_size} exceeds --n-positions {config.n_positions}")

    train_ds = pack(load_text(args.train, sample_by=args.sample_by, fix=args.fix_text), tokenizer, block_size)
    if args.eval:
        eval_ds = pack(load_text(args.eval, sample_by=args.sample_by, fix=args.fix_text), tokenizer, block_size)
        eval_name = ", ".join(map(str, args.eval))
    else:
        train_ds, eval_ds = split_heldout(train_ds, args.eval_fraction, args.seed)
        eval_name = f"{args.eval_fraction:g} of the training blocks (seed {args.seed})"
    train_ds = limit(train_ds, args.max_train_examples)
    eval_ds = limit(eval_ds, args.max_eval_examples)

    model = GPT2LMHeadModel(config)
    card = ModelCard(task="generate", data={
        "train": [str(p) for p in args.train], "eval": eval_name,
        "train_tokens": len(train_ds) * block_size, "eval_tokens": len(eval_ds) * block_size,
        "block_size": block_size, "text_fix": text_fix_note(args.fix_text),
    })
    job = Job(name="pretrain", model=model, tokenizer=tokenizer, train_dataset=train_ds, eval_dataset=eval_ds,
              collator=default_data_collator, card=card, report_perplexity=True)
    return run_job(job, args)
