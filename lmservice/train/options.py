"""Flags shared by the training jobs, and their translation into `TrainingArguments`.

One place names every optimisation knob, so `pretrain`, `lm`, `classify` and
`translate` read the same flags and record the same hyperparameters in the card.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

# Flags recorded in the card's `hyperparameters` (everything that changes the weights).
_HYPERPARAMETERS = (
    "epochs", "max_steps", "batch_size", "grad_accum", "lr", "lr_scheduler", "warmup_steps",
    "weight_decay", "max_grad_norm", "label_smoothing", "seed", "sampling", "bf16", "max_length",
    "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_extract",
)


def add_text_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-fix-text", dest="fix_text", action="store_false",
                   help="Train on the text as it is; by default ftfy repairs mojibake, HTML entities and curly "
                        "quotes as the data loads (recorded in the card as data.text_fix).")


def add_base_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", type=Path, required=True,
                   help="GPT-2-family checkpoint dir to start from (recorded as given in the artifact).")
    p.add_argument("--max-length", type=int, default=None,
                   help="Longest example in tokens (default: the model's n_positions).")


def add_training_arguments(p: argparse.ArgumentParser, lr: float, lora: bool = True) -> None:
    add_text_arguments(p)
    p.add_argument("--output", type=Path, required=True, help="Artifact directory to write (atomically).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="Optimizer steps; overrides --epochs when > 0.")
    p.add_argument("--batch-size", type=int, default=16, help="Per process (global = this x procs x accum).")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--lr-scheduler", default="cosine")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="Label smoothing of the training loss (0.1 is usual for translation); eval loss is smoothed too.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", choices=["random", "sequential", "group_by_length"], default="random",
                   help="Training order: random, file order, or batches of similar length (less padding).")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU with AMX/AVX512-BF16, or GPU).")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process.")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--eval-steps", type=int, default=0, help="Evaluate every N steps (0: only at the end).")
    p.add_argument("--save-steps", type=int, default=200, help="Checkpoint every N steps (resume point).")
    p.add_argument("--eval-fraction", type=float, default=0.05,
                   help="Held-out fraction of the training data when no --eval file is given.")
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--max-eval-examples", type=int, default=None)
    p.add_argument("--keep-checkpoints", action="store_true", help="Keep <output>.work/ after success.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar (logs only).")
    p.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of a saved full checkpoint (adapters stay float32).")
    if lora:
        p.add_argument("--lora", action="store_true", help="Train a LoRA adapter instead of all weights.")
        p.add_argument("--lora-r", type=int, default=8)
        p.add_argument("--lora-alpha", type=float, default=16.0)
        p.add_argument("--lora-dropout", type=float, default=0.0)
        p.add_argument("--lora-targets", nargs="+", default=["c_attn"],
                       help="Module names (suffixes) that get LoRA, e.g. c_attn c_proj c_fc, and wte (token "
                            "embeddings: a classifier may need to move words the base never saw labelled).")
        p.add_argument("--lora-extract", action="store_true",
                       help="With --lora: train the weights of the --lora-targets projections in full (embeddings, "
                            "norms and biases frozen), then save their change as a rank --lora-r adapter "
                            "(truncated SVD); the figures are measured on that adapter.")


def hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _HYPERPARAMETERS if hasattr(args, k)}


def training_arguments(args: argparse.Namespace, work_dir: Path, has_eval: bool) -> TrainingArguments:
    """TrainingArguments whose checkpoints go to `work_dir` (the resume state)."""
    eval_steps = args.eval_steps if args.eval_steps > 0 else None
    return TrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        label_smoothing_factor=args.label_smoothing,
        seed=args.seed,
        data_seed=args.seed,
        train_sampling_strategy=args.sampling,
        bf16=args.bf16,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (has_eval and eval_steps) else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        report_to=[],
        disable_tqdm=True,  # our ProgressCallback draws the bar (loss + throughput)
        include_num_input_tokens_seen=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        use_cpu=not _cuda_available(),
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
