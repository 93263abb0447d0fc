"""benchmarks/kernels.py --dry-run: every part of the GPU benchmark, end to end on tiny CPU shapes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROWS = ["varlen prefill attention, contiguous", "same, block tables + prefix-cached chunks",
        "paged decode attention", "whole decode step", "fused residual + LayerNorm", "bias + GELU(tanh)"]


def test_dry_run_prints_a_checked_table():
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/kernels.py", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.splitlines()
    for name in ROWS:
        assert any(line.startswith(f"| {name}") for line in table), f"no row for {name}:\n{proc.stdout}"
    assert not any("error in" in line or "FAILED" in line for line in table), proc.stdout
    assert table[-1].startswith("checks: ") and table[-1].endswith(" 0 failed"), table[-1]
    assert any("split2" in line for line in table), "the dry run must exercise the split-KV merge"
