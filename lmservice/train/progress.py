"""A progress bar with the loss and the throughput (tokens/s), on the main process only."""

from __future__ import annotations

import time

from tqdm.auto import tqdm
from transformers import TrainerCallback


class ProgressCallback(TrainerCallback):
    """tqdm over optimizer steps; postfix: last logged loss, learning rate, input tokens/s.

    Throughput counts every input token of every process (Trainer's
    `num_input_tokens_seen` is gathered across ranks) over the steps since the
    previous loss log, so neither the first steps' warm-up nor a resume (whose
    token count starts where the checkpoint left it) skews the figure.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.t0 = 0.0
        self.tokens0 = 0
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.enabled:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)
        self.t0 = time.perf_counter()
        self.tokens0 = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            now = time.perf_counter()
            tok_s = (state.num_input_tokens_seen - self.tokens0) / max(now - self.t0, 1e-9)
            self.t0, self.tokens0 = now, state.num_input_tokens_seen
            self.postfix.update(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}",
                                tok_s=f"{tok_s:.0f}")
        if "eval_loss" in logs:
            self.postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=True)
        elif state.is_world_process_zero and ("loss" in logs or "eval_loss" in logs):
            print(f"step {state.global_step}/{state.max_steps} " + " ".join(f"{k}={v}" for k, v in self.postfix.items()),
                  flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
