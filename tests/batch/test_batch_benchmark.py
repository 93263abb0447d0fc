"""benchmarks/batch.py runs end to end on a tiny model (its figures are measured elsewhere, never here)."""

from __future__ import annotations

import subprocess
import sys

from tests.servers import ROOT


def test_batch_benchmark_reports_both_sides(model_dirs):
    proc = subprocess.run([sys.executable, "benchmarks/batch.py", "--model", str(model_dirs["base"]), "--requests",
                           "12", "--prompt-len", "4", "--new-tokens", "3", "--concurrency", "4",
                           "--batch-concurrency", "4", "--serve-arg=--device", "--serve-arg=cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| ")][2:]
    assert [(r[0], r[1], r[2]) for r in rows] == [("lmservice batch", "4", "36"), ("lmservice serve (HTTP)", "4", "36")]
    assert all(float(r[4]) > 0 for r in rows)
