"""`lmservice train translate`: translation as prompted generation, full or --lora.

One training example is `prompt_template.replace("{text}", src)` (the prompt,
no loss) followed by `" " + tgt` and EOS (the loss). The card stores the exact
template, so the server renders the same prompt and stops at EOS. BLEU and chrF
on the held-out pairs come from greedy generations at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from transformers import GPT2LMHeadModel

from lmservice.model.card import Languages, ModelCard
from lmservice.train.data import DataError, limit, load_parallel, load_table, split_heldout, text_fix_note
from lmservice.train.evaluate import greedy_generate, translation_metrics
from lmservice.train.examples import PadCollator, encode_prompt_completion
from lmservice.train.modeling import load_for_training, lora_finalizer
from lmservice.train.options import add_base_arguments, add_training_arguments
from lmservice.train.runner import Job, run_job, setup

LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "cs": "Czech", "es": "Spanish"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_base_arguments(p)
    p.add_argument("--train", type=Path, default=None, help="jsonl/csv/tsv/parquet with src and tgt columns.")
    p.add_argument("--train-src", type=Path, default=None, help="Source side (one sentence a line).")
    p.add_argument("--train-tgt", type=Path, default=None, help="Target side, line-aligned with --train-src.")
    p.add_argument("--eval", type=Path, default=None)
    p.add_argument("--eval-src", type=Path, default=None)
    p.add_argument("--eval-tgt", type=Path, default=None)
    p.add_argument("--source-lang", default="en")
    p.add_argument("--target-lang", default="de")
    p.add_argument("--prompt-template", default=None,
                   help='Prompt with {text} for the source (default: "<Source>: {text}\\n<Target>:").')
    p.add_argument("--max-new-tokens", type=int, default=96, help="Generation limit for the BLEU eval.")
    add_training_arguments(p, lr=1e-3)


def _pairs(table: Path | None, src: Path | None, tgt: Path | None, which: str, fix: bool) -> Dataset | None:
    if table is not None and (src or tgt):
        raise DataError(f"give --{which} or --{which}-src/--{which}-tgt, not both")
    if table is not None:
        return load_table(table, ["src", "tgt"], fix=["src", "tgt"] if fix else []).select_columns(["src", "tgt"])
    if src is None and tgt is None:
        return None
    if src is None or tgt is None:
        raise DataError(f"--{which}-src and --{which}-tgt go together")
    return load_parallel(src, tgt, fix=fix)


def default_template(source_lang: str, target_lang: str) -> str:
    src = LANGUAGE_NAMES.get(source_lang, source_lang)
    tgt = LANGUAGE_NAMES.get(target_lang, target_lang)
    return f"{src}: {{text}}\n{tgt}:"


def run(args: argparse.Namespace) -> int:
    setup(args)
    template = args.prompt_template or default_template(args.source_lang, args.target_lang)
    if "{text}" not in template:
        raise DataError(f"--prompt-template must contain {{text}}: {template!r}")
    train_pairs = _pairs(args.train, args.train_src, args.train_tgt, "train", args.fix_text)
    if train_pairs is None:
        raise DataError("no training data: give --train (src/tgt table) or --train-src and --train-tgt")
    eval_pairs = _pairs(args.eval, args.eval_src, args.eval_tgt, "eval", args.fix_text)
    if eval_pairs is not None:
        eval_name = str(args.eval or f"{args.eval_src} -> {args.eval_tgt}")
    else:
        train_pairs, eval_pairs = split_heldout(train_pairs, args.eval_fraction, args.seed)
        eval_name = f"{args.eval_fraction:g} of the training pairs (seed {args.seed})"
    train_pairs = limit(train_pairs, args.max_train_examples)
    eval_pairs = limit(eval_pairs, args.max_eval_examples)

    model, tokenizer = load_for_training(args, GPT2LMHeadModel, task_type="CAUSAL_LM")
    max_length = args.max_length or model.config.n_positions

    def prompt(r: dict) -> str:
        return template.replace("{text}", r["src"])

    def completion(r: dict) -> str:
        return " " + r["tgt"]

    train_ds = encode_prompt_completion(train_pairs, tokenizer, prompt, completion, max_length)
    eval_ds = encode_prompt_completion(eval_pairs, tokenizer, prompt, completion, max_length)

    def extra_metrics(trained) -> dict:
        hypotheses = greedy_generate(trained, tokenizer, [prompt(r) for r in eval_pairs], args.max_new_tokens)
        return {**translation_metrics(hypotheses, eval_pairs["tgt"]), "num_eval_pairs": len(eval_pairs),
                "samples": [{"src": s, "ref": t, "hyp": h} for s, t, h
                            in zip(eval_pairs["src"][:5], eval_pairs["tgt"][:5], hypotheses[:5], strict=True)]}

    card = ModelCard(task="translate", prompt_template=template,
                     languages=Languages(source=args.source_lang, target=args.target_lang),
                     data={"train": str(args.train or f"{args.train_src} -> {args.train_tgt}"), "eval": eval_name,
                           "num_train_examples": len(train_ds), "text_fix": text_fix_note(args.fix_text),
                           "format": 'prompt_template.replace("{text}", src) + " " + tgt + eos'})
    job = Job(name="translate", model=model, tokenizer=tokenizer, train_dataset=train_ds, eval_dataset=eval_ds,
              collator=PadCollator(tokenizer.pad_token_id), card=card, base_model=str(args.base),
              extra_metrics=extra_metrics, finalize=lora_finalizer(args, "CAUSAL_LM"))
    return run_job(job, args)
