"""Overfit one batch: with one fixed batch of 8 blocks, the LM loss falls from ~ln(vocab) below 0.5 in 60 steps.

A job whose loss, labels, optimizer or LR wiring is broken cannot memorise 8 x 32 tokens this fast.
"""

from __future__ import annotations

import json


def test_lm_job_overfits_one_batch(train, base_dir, data_dir, tmp_path):
    out = tmp_path / "overfit"
    assert train("lm", "--base", base_dir, "--train", data_dir / "text.txt", "--sample-by", "line",
                 "--max-length", "32", "--max-train-examples", "8", "--eval-fraction", "0.1",
                 "--max-steps", "60", "--lr", "1e-2", "--lr-scheduler", "constant", "--save-steps", "1000",
                 "--output", out) == 0
    history = json.loads((out / "trainer_log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[0] > 4.0, losses[0]  # starts near ln(400) = 6.0
    assert losses[-1] < 0.5, losses[-5:]
