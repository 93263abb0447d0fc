"""scripts/gpu_check.sh --dry-run: every step of the GPU check, end to end on the CPU at tiny shapes, with the
files the device machine would send back; and the driver's time limits, which a dry run never reaches."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = {r["step"]: r for r in summary["steps"]}
    assert list(steps) == list(_driver().STEPS), "every step, in order"
    for name, record in steps.items():
        assert record["status"] == "ok", (name, record.get("failed_checks"), (record.get("error") or "")[-2000:])
        assert record["dry_run"] and record["seconds"] > 0
    assert all(steps[n]["checks"] for n in steps if n != "decode_step"), "a step that checks nothing proves nothing"
    report = (tmp_path / "report.md").read_text()
    assert "DRY RUN" in report and report.count("\n| --- |") >= 1 and "### serve" in report
    # $OUT set: what the device machine sends back is at most 8 files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "report.md", "steps.tar.gz", "summary.json"]
    with tarfile.open(tmp_path / "steps.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"steps/{n}.{ext}" for n in steps for ext in ("json", "log")} <= names
    assert "steps/serve_server.log" in names


def test_a_step_past_its_limit_is_killed_and_recorded(tmp_path):
    """Negative control for the limits: a real step given 1 s (less than importing torch takes, so the step
    cannot finish or fail first on any machine) is killed, its whole process group with it."""
    driver = _driver()
    (tmp_path / "steps").mkdir()
    record = driver.run_one("parity", 1, tmp_path, dry=True)
    assert record["status"] == "timeout" and record["seconds"] < 15, record
    assert "killed after 1 s" in record["error"]
    assert json.loads((tmp_path / "steps" / "parity.json").read_text())["status"] == "timeout"


def test_steps_past_the_budget_are_skipped_and_fail_the_run(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--budget-s", "5", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["status"] for r in summary["steps"]} == {"skipped"} and not summary["ok"]
