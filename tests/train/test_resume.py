"""Resume: a run killed with SIGKILL right after a checkpoint, rerun with the same command, ends with
exactly the weights of an uninterrupted run (CPU, one thread, dropout on: RNG state is restored too).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmservice.train.artifact import work_dir_for

REPO = Path(__file__).resolve().parents[2]

# Runs the job in a child process whose progress callback SIGKILLs it once the step-4 checkpoint is on disk.
_KILL_AFTER_CHECKPOINT = """
import os, signal, sys
import lmservice.train.runner as runner
class KillAfterSave(runner.ProgressCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
runner.ProgressCallback = KillAfterSave
from lmservice.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _argv(base_dir, data_dir, out) -> list[str]:
    # The base has dropout 0.1, so an RNG state not restored on resume would change the weights.
    return ["lm", "--base", str(base_dir), "--train", str(data_dir / "prompts.jsonl"), "--max-steps", "8",
            "--lr", "1e-2", "--output", str(out), "--batch-size", "4", "--save-steps", "4", "--threads", "1",
            "--no-progress"]


def test_resume_after_kill_equals_uninterrupted_run(base_dir, data_dir, tmp_path, capsys):
    from lmservice.train.cli import main

    straight = tmp_path / "straight"
    assert main(_argv(base_dir, data_dir, straight)) == 0

    resumed = tmp_path / "resumed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_CHECKPOINT, *_argv(base_dir, data_dir, resumed)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not resumed.exists(), "no artifact from a killed run"
    assert (work_dir_for(resumed) / "checkpoint-4").is_dir()

    capsys.readouterr()
    assert main(_argv(base_dir, data_dir, resumed)) == 0
    assert f"resuming from {work_dir_for(resumed) / 'checkpoint-4'}" in capsys.readouterr().out
    a = load_file(straight / "model.safetensors")
    b = load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
