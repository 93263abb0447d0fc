"""The one training flow every job shares: Trainer -> resume -> train -> evaluate -> artifact.

A job builds a `Job` (model, datasets, collator, card, extra metrics) and calls
`run_job`. Checkpoints go to `<output>.work/`; rerunning the same command after
a kill resumes from the last one (Trainer restores weights, optimizer,
scheduler, RNG states and the data position). Under torchrun every rank trains;
only rank 0 runs the extra evaluation and writes the artifact.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, Trainer, set_seed
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from lmservice.model.card import ModelCard
from lmservice.train.artifact import atomic_directory, plot_curves, save_history, work_dir_for
from lmservice.train.modeling import count_parameters
from lmservice.train.options import hyperparameters, training_arguments
from lmservice.train.progress import ProgressCallback

_SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Job:
    """What a job hands to `run_job`. `extra_metrics(model)` runs on rank 0 after training."""

    name: str
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    train_dataset: Dataset
    eval_dataset: Dataset | None
    collator: Callable
    card: ModelCard
    base_model: str | None = None  # dir path as given, for adapters' base_model_name_or_path
    extra_metrics: Callable[[torch.nn.Module], dict[str, Any]] | None = None
    # Turns the trained model into the one saved and measured (--lora-extract); None keeps it.
    finalize: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    report_perplexity: bool = False
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def setup(args: argparse.Namespace) -> None:
    """Thread count and seed, before any model is built: fresh weights (a pretrained model, a LoRA
    factor, a score head) are drawn from the seeded RNG, so a run is reproducible and every
    torchrun rank starts from the same weights."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    set_seed(args.seed)


def _rank0_print(trainer: Trainer, msg: str) -> None:
    if trainer.is_world_process_zero():
        print(msg, flush=True)


def run_job(job: Job, args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} already exists (pass --overwrite to replace it)")
    work_dir = work_dir_for(output)
    targs = training_arguments(args, work_dir, has_eval=job.eval_dataset is not None)
    trainer = Trainer(
        model=job.model,
        args=targs,
        train_dataset=job.train_dataset,
        eval_dataset=job.eval_dataset,
        data_collator=job.collator,
        callbacks=[ProgressCallback(enabled=not args.no_progress)],
        **job.trainer_kwargs,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressCallback reports; no raw dict per log
    trainable, total = count_parameters(job.model)
    resume = get_last_checkpoint(str(work_dir)) if work_dir.is_dir() else None
    _rank0_print(trainer, f"[{job.name}] params: {trainable:,} trainable / {total:,} total; "
                          f"train {len(job.train_dataset):,} examples"
                          + (f"; resuming from {resume}" if resume else ""))

    t0 = time.perf_counter()
    train_out = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - t0
    if job.finalize is not None:
        trainer.model = trainer.model_wrapped = job.finalize(trainer.model)

    metrics: dict[str, Any] = {}
    if job.eval_dataset is not None:
        eval_out = trainer.evaluate()
        metrics["eval_loss"] = round(eval_out["eval_loss"], 5)
        if job.report_perplexity:
            metrics["perplexity"] = round(math.exp(min(eval_out["eval_loss"], 50.0)), 3)
    if not trainer.is_world_process_zero():
        return 0

    model = trainer.model
    model.eval()
    if job.extra_metrics is not None:
        metrics.update(job.extra_metrics(model))
    metrics.update(train_loss=round(train_out.training_loss, 5), train_steps=trainer.state.global_step,
                   train_seconds_this_run=round(train_seconds, 1), num_trainable_parameters=trainable,
                   num_parameters=total)

    card = job.card.model_copy(update={
        "base_model": job.base_model,
        "hyperparameters": {**hyperparameters(args), "world_size": targs.world_size},
        "metrics": metrics,
    })
    with atomic_directory(output, overwrite=args.overwrite) as tmp:
        _save_model(model, tmp, job.base_model, getattr(args, "save_dtype", "float32"))
        if not isinstance(model, PeftModel):
            job.tokenizer.save_pretrained(tmp)
        card.save(tmp)
        save_history(tmp, trainer.state.log_history)
        plot_curves(tmp, trainer.state.log_history, f"{job.name}: {output.name}")
    if not args.keep_checkpoints:
        shutil.rmtree(work_dir, ignore_errors=True)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    print(f"[{job.name}] wrote {output}: " + ", ".join(f"{k}={v}" for k, v in scalars.items()), flush=True)
    return 0


def _save_model(model: torch.nn.Module, directory: Path, base_model: str | None, save_dtype: str) -> None:
    if isinstance(model, PeftModel):
        # The adapter names its base as the user gave it, so the server can resolve it.
        if base_model is not None:
            for cfg in model.peft_config.values():
                cfg.base_model_name_or_path = base_model
        model.save_pretrained(str(directory))
        return
    model.to(_SAVE_DTYPES[save_dtype]).save_pretrained(str(directory))
