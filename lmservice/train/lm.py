"""`lmservice train lm`: causal-LM fine-tuning of a GPT-2-family model, full or --lora.

Data: plain text (packed into blocks, every token trained), jsonl `{"text"}`
(the same), or jsonl `{"prompt","completion"}` (loss on the completion and its
EOS only; the completion is appended to the prompt verbatim, so put any
separating space in the data).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase, default_data_collator

from lmservice.model.card import ModelCard
from lmservice.train.data import DataError, limit, load_table, load_text, split_heldout, text_fix_note
from lmservice.train.examples import PadCollator, encode_prompt_completion, pack
from lmservice.train.modeling import load_for_training, lora_finalizer
from lmservice.train.options import add_base_arguments, add_training_arguments
from lmservice.train.runner import Job, run_job, setup

_TABLE_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_base_arguments(p)
    p.add_argument("--train", type=Path, required=True, help="Text file, or jsonl with text / prompt+completion.")
    p.add_argument("--eval", type=Path, default=None, help="Held-out file in the same format.")
    p.add_argument("--sample-by", choices=["line", "paragraph", "document"], default="paragraph",
                   help="How plain text splits into examples before packing.")
    add_training_arguments(p, lr=2e-4)


def _format_of(path: Path) -> str:
    """'text' (plain file), 'text_column' or 'prompt_completion' (tables), from the file itself."""
    if path.suffix.lower() not in _TABLE_SUFFIXES:
        return "text"
    columns = load_table(path, []).column_names
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "text" in columns:
        return "text_column"
    raise DataError(f"{path}: missing column(s): need `text`, or `prompt` and `completion`; the file has {columns}")


def _encode(path: Path, fmt: str, tokenizer: PreTrainedTokenizerBase, max_length: int, sample_by: str,
            fix: bool) -> Dataset:
    fix_columns = ["text", "prompt", "completion"] if fix else []
    if fmt == "text":
        return pack(load_text([path], sample_by=sample_by, fix=fix), tokenizer, max_length)
    if fmt == "text_column":
        return pack(load_table(path, ["text"], fix=fix_columns).select_columns(["text"]), tokenizer, max_length)
    return encode_prompt_completion(load_table(path, ["prompt", "completion"], fix=fix_columns), tokenizer,
                                    lambda r: r["prompt"], lambda r: r["completion"], max_length)


def run(args: argparse.Namespace) -> int:
    setup(args)
    fmt = _format_of(args.train)  # bad data fails before the model loads
    model, tokenizer = load_for_training(args, GPT2LMHeadModel, task_type="CAUSAL_LM")
    max_length = args.max_length or model.config.n_positions
    train_ds = _encode(args.train, fmt, tokenizer, max_length, args.sample_by, args.fix_text)
    if args.eval is not None:
        if _format_of(args.eval) != fmt:
            raise DataError(f"{args.eval}: not the same format as {args.train} ({fmt})")
        eval_ds = _encode(args.eval, fmt, tokenizer, max_length, args.sample_by, args.fix_text)
        eval_name = str(args.eval)
    else:
        train_ds, eval_ds = split_heldout(train_ds, args.eval_fraction, args.seed)
        eval_name = f"{args.eval_fraction:g} of the training examples (seed {args.seed})"
    train_ds = limit(train_ds, args.max_train_examples)
    eval_ds = limit(eval_ds, args.max_eval_examples)
    # Packed blocks all have one length; prompt/completion rows need padding and a loss mask.
    collator = default_data_collator if fmt != "prompt_completion" else PadCollator(tokenizer.pad_token_id)
    card = ModelCard(task="generate", data={"train": str(args.train), "eval": eval_name, "format": fmt, "text_fix": text_fix_note(args.fix_text),
                                            "num_train_examples": len(train_ds)})
    job = Job(name="lm", model=model, tokenizer=tokenizer, train_dataset=train_ds, eval_dataset=eval_ds,
              collator=collator, card=card, base_model=str(args.base), report_perplexity=True,
              finalize=lora_finalizer(args, "CAUSAL_LM"))
    return run_job(job, args)
