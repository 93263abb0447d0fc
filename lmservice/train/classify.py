"""`lmservice train classify`: sequence classification on a GPT-2-family model, full or --lora.

The model is transformers' GPT2ForSequenceClassification: the score head reads
the hidden state of the last real token (padding is on the right and is the
pad/EOS id, which the texts themselves never end with). With --lora the score
head is trained in full and saved inside the adapter (PEFT `modules_to_save`),
so the adapter dir alone turns the base into the classifier.

Labels: `--labels` declares the label values in head order (default: the sorted
values found in the training file); a row whose label is not declared is an
error before training. `--label-names` renames them for the card and id2label.
Texts are stripped of surrounding whitespace (SST-2 rows end with a space; a
user's request does not).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset, Value
from transformers import GPT2ForSequenceClassification, PreTrainedTokenizerBase

from lmservice.model.card import ModelCard
from lmservice.train.data import DataError, limit, load_table, split_heldout, text_fix_note
from lmservice.train.evaluate import classification_metrics, predict_labels
from lmservice.train.examples import PadCollator, encode_texts
from lmservice.train.modeling import load_for_training, lora_finalizer
from lmservice.train.options import add_base_arguments, add_training_arguments
from lmservice.train.runner import Job, run_job, setup


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_base_arguments(p)
    p.add_argument("--train", type=Path, required=True, help="csv/tsv/jsonl/parquet with text and label columns.")
    p.add_argument("--eval", type=Path, default=None, help="Held-out file in the same format.")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--no-header", action="store_true", help="csv/tsv without a header: columns are text, label.")
    p.add_argument("--labels", nargs="+", default=None, help="Declared label values, in head order.")
    p.add_argument("--label-names", nargs="+", default=None, help="Names for --labels (same order).")
    add_training_arguments(p, lr=5e-4)


def _load(path: Path, args: argparse.Namespace) -> Dataset:
    ds = load_table(path, [args.text_column, args.label_column], header=not args.no_header,
                    fix=[args.text_column] if args.fix_text else [])
    # Labels compare as strings: `--labels 0 1` must match an int column as well as a string one.
    ds = ds.cast_column(args.label_column, Value("string"))
    return ds.map(lambda r: {args.label_column: (r[args.label_column] or "").strip()})


def _declared_labels(train: Dataset, args: argparse.Namespace) -> list[str]:
    labels = list(args.labels) if args.labels else sorted(set(train[args.label_column]))
    if len(set(labels)) != len(labels):
        raise DataError(f"--labels has duplicates: {labels}")
    if len(labels) < 2:
        raise DataError(f"need at least 2 labels, got {labels}")
    return labels


def _check_labels(ds: Dataset, path: Path, column: str, labels: list[str]) -> None:
    found = set(ds[column])
    unknown = sorted(found - set(labels))
    if unknown:
        raise DataError(f"{path}: column `{column}` has label(s) {unknown[:10]} not in the declared set {labels}")


def _encode(ds: Dataset, tokenizer: PreTrainedTokenizerBase, args: argparse.Namespace, labels: list[str],
            max_length: int) -> Dataset:
    index = {label: i for i, label in enumerate(labels)}
    ds = ds.map(lambda r: {args.text_column: str(r[args.text_column] or "").strip()})
    return encode_texts(ds, tokenizer, args.text_column, max_length,
                        extra=lambda batch: {"labels": [index[v] for v in batch[args.label_column]]})


def run(args: argparse.Namespace) -> int:
    setup(args)
    train_raw = _load(args.train, args)
    labels = _declared_labels(train_raw, args)
    _check_labels(train_raw, args.train, args.label_column, labels)
    eval_raw = None
    if args.eval is not None:
        eval_raw = _load(args.eval, args)
        _check_labels(eval_raw, args.eval, args.label_column, labels)
    names = list(args.label_names) if args.label_names else labels
    if len(names) != len(labels):
        raise DataError(f"--label-names has {len(names)} names for {len(labels)} labels {labels}")

    model, tokenizer = load_for_training(
        args, GPT2ForSequenceClassification, task_type="SEQ_CLS", modules_to_save=["score"],
        num_labels=len(labels), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    max_length = args.max_length or model.config.n_positions
    train_ds = _encode(train_raw, tokenizer, args, labels, max_length)
    if eval_raw is not None:
        eval_ds, eval_name = _encode(eval_raw, tokenizer, args, labels, max_length), str(args.eval)
    else:
        train_ds, eval_ds = split_heldout(train_ds, args.eval_fraction, args.seed)
        eval_name = f"{args.eval_fraction:g} of the training rows (seed {args.seed})"
    train_ds = limit(train_ds, args.max_train_examples)
    eval_ds = limit(eval_ds, args.max_eval_examples)
    collator = PadCollator(tokenizer.pad_token_id)

    def extra_metrics(trained) -> dict:
        batches = [collator([eval_ds[j] for j in range(i, min(i + 64, len(eval_ds)))])
                   for i in range(0, len(eval_ds), 64)]
        predictions = predict_labels(trained, batches)
        return classification_metrics(predictions, eval_ds["labels"], len(labels))

    card = ModelCard(task="classify", labels=names, data={
        "train": str(args.train), "eval": eval_name, "text_column": args.text_column,
        "label_column": args.label_column, "label_values": labels, "num_train_examples": len(train_ds),
        "num_eval_examples": len(eval_ds), "preprocessing": "text stripped of surrounding whitespace",
        "text_fix": text_fix_note(args.fix_text)})
    job = Job(name="classify", model=model, tokenizer=tokenizer, train_dataset=train_ds, eval_dataset=eval_ds,
              collator=collator, card=card, base_model=str(args.base), extra_metrics=extra_metrics,
              finalize=lora_finalizer(args, "SEQ_CLS", ["score"]))
    return run_job(job, args)
