"""torchrun --nproc-per-node 2 (gloo on CPU, 4 blocks per process) gives the loss curve of one process
with 8 blocks per step: the same global batch, so the same steps up to float summation order (1e-4).

Sequential sampling makes the global batch the same 8 blocks in both runs (accelerate hands rank r
the r-th per-process batch); dropout 0 and a seeded init make the forward passes identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _losses(out: Path) -> list[float]:
    history = json.loads((out / "trainer_log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_processes_match_one_with_the_same_global_batch(tokenizer_dir, data_dir, tmp_path):
    def argv(out: Path, batch_size: int) -> list[str]:
        return ["-m", "lmservice.cli", "train", "pretrain", "--tokenizer", str(tokenizer_dir),
                "--train", str(data_dir / "text.txt"), "--sample-by", "line", "--preset", "tiny",
                "--n-embd", "32", "--n-positions", "32", "--max-steps", "5", "--batch-size", str(batch_size),
                "--sampling", "sequential", "--logging-steps", "1", "--threads", "1", "--no-progress",
                "--output", str(out)]

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    for attempt in range(2):
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        shutil.rmtree(tmp_path / "two.work", ignore_errors=True)
        two = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", *argv(tmp_path / "two", 4)],
                             env=env, capture_output=True, text=True, timeout=300)
        # NOTE: once, on a machine loaded 5x over its 2 cores, a rank died by SIGABRT inside gloo (seen in CI
        # runs, never alone). One retry for a child killed by a signal; any other failure fails at once.
        if two.returncode == 0 or "Signal 6 (SIGABRT)" not in two.stderr or attempt == 1:
            break
    clues = [line for line in two.stderr.splitlines() if any(k in line for k in ("rror", "terminate", "gloo"))]
    assert two.returncode == 0, "\n".join(clues[:40]) + "\n...\n" + two.stderr[-2000:]
    one = subprocess.run([sys.executable, *argv(tmp_path / "one", 8)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    card = json.loads((tmp_path / "two" / "lmservice.json").read_text())
    assert card["hyperparameters"]["world_size"] == 2
    two_losses, one_losses = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two_losses) == len(one_losses) == 5
    assert two_losses == pytest.approx(one_losses, abs=1e-4)
    assert one_losses[-1] < one_losses[0]  # it trained
