"""The GPU bring-up check: every step of it, one process each, each under its own time limit.

    python scripts/gpu_check.py --out DIR               # on a CUDA GPU (scripts/gpu_check.sh sets it up)
    python scripts/gpu_check.py --out DIR --dry-run     # on the CPU: tiny shapes, Triton interpreter
    python scripts/gpu_check.py --out DIR --steps parity,serve   # some steps only

Writes DIR/steps/<step>.log and DIR/steps/<step>.json (status ok | failed | error | timeout | skipped,
the checks, the figures, markdown tables), then DIR/summary.json (every step's record) and
DIR/report.md (every table, for docs/benchmarks.md). --bundle packs DIR/steps into DIR/steps.tar.gz
(the device machine sends back at most 8 files). The exit status is 0 only when every step is ok.

A step that outlives its limit is killed with everything it started (its own process group), after
Python's faulthandler has dumped its threads' stacks into its log; the steps after it still run while
the overall budget (--budget-s) lasts. Nothing here imports torch: the driver stays responsive.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (module under benchmarks/gpu, limit in seconds on a GPU, what it shows); in the order they run,
# most important first. The limits add up to more than the budget: they cap a hang, the budget caps the run.
STEPS = {
    "env": ("env", 60, "versions, device, copy bandwidth and bf16 matmul ceilings"),
    "kernel_tests": ("kernel_tests", 120, "every Triton kernel compiled for the GPU vs its torch reference"),
    "parity": ("parity", 120, "engine greedy parity with transformers: fp32, bf16, graphs, prefix cache, chunks"),
    "kernel_bench": ("kernel_bench", 120, "prefill vs flash SDPA, paged decode vs copy bandwidth"),
    "decode_step": ("decode_step", 90, "GPT-2 small decode step (CUDA graphs) vs its byte floor"),
    "serve": ("serve", 150, "lmservice serve vs transformers generate, c = 1/32/256"),
    "lora": ("lora", 90, "multi-LoRA vs PEFT; 8 adapters vs base only"),
    "structured": ("structured", 75, "structured output on CUDA: mask on the GPU, mixed batch, CPU parity"),
    "int8": ("int8", 45, "--quantization int8 on CUDA, or the statement that it is CPU-only"),
}
DRY_RUN_LIMIT_S = 120  # per step: interpreter and CPU times on a shared machine
KILL_GRACE_S = 5


def missing_wheels(folder: Path) -> list[str]:
    """The wheels in `folder` whose distribution is not installed here (none is installed twice)."""
    out = []
    for wheel in sorted(folder.glob("*.whl")):
        name = wheel.name.split("-")[0]
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(str(wheel))
    return out


def child(name: str, out: Path, dry: bool) -> int:
    """Run one step in this process (the driver's child) and write its JSON."""
    import importlib
    import tempfile

    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu.common import run_step, write_json

    module = importlib.import_module(f"benchmarks.gpu.{STEPS[name][0]}")
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        record = run_step(name, module, dry, Path(tmp), out / "steps")
    write_json(out / "steps" / f"{name}.json", record)
    return 0 if record["status"] == "ok" else 1


def run_one(name: str, limit_s: float, out: Path, dry: bool) -> dict:
    """Start one step's process, wait for it at most limit_s, and return its record."""
    steps = out / "steps"
    log_path, json_path = steps / f"{name}.log", steps / f"{name}.json"
    json_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if dry:
        env["TRITON_INTERPRET"] = "1"  # NOTE: read when the kernel modules are decorated, so set before Python starts
    else:
        env.pop("TRITON_INTERPRET", None)
    # faulthandler dumps every thread's stack shortly before the kill: a hang names its line in the log
    cmd = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), "--child", name, "--out", str(out),
           "--stack-dump-s", str(max(1, int(limit_s) - KILL_GRACE_S - 2)), *(["--dry-run"] if dry else [])]
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out, rc = True, None
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=KILL_GRACE_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
    seconds = round(time.monotonic() - start, 1)
    if json_path.exists() and not timed_out:
        record = json.loads(json_path.read_text())
    else:
        tail = log_path.read_text(errors="replace")[-3000:]
        record = {"step": name, "status": "timeout" if timed_out else "error", "dry_run": dry, "checks": [],
                  "failed_checks": [], "metrics": {}, "tables": [], "notes": [],
                  "error": (f"killed after {limit_s:.0f} s" if timed_out else f"exit status {rc}, no record")
                  + f"; log tail:\n{tail}"}
    record.update(seconds=seconds, limit_s=round(limit_s), log=f"steps/{name}.log")
    json_path.write_text(json.dumps(record, indent=1))
    return record


def report(records: list[dict], header: str) -> str:
    lines = [header, "", "| step | status | seconds | limit | failed checks |", "| --- | --- | ---: | ---: | --- |"]
    for r in records:
        failed = ", ".join(r.get("failed_checks", [])) or (r["error"].splitlines()[0] if r.get("error") else "")
        lines.append(f"| {r['step']} | {r['status']} | {r.get('seconds', 0)} | {r.get('limit_s', '-')} | {failed[:200]} |")
    for r in records:
        if r.get("tables") or r.get("notes"):
            lines += ["", f"### {r['step']}: {STEPS[r['step']][2]}", ""]
            lines += [t + "\n" for t in r.get("tables", [])]
            lines += [f"- {n}" for n in r.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "gpu_check_out")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU at tiny shapes (Triton interpreter)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from: {','.join(STEPS)}")
    ap.add_argument("--budget-s", type=float, default=420, help="the whole run's time; a step gets what is left")
    ap.add_argument("--bundle", action="store_true", help="pack OUT/steps into OUT/steps.tar.gz")
    ap.add_argument("--missing-wheels", type=Path, help="print the wheels in this folder not installed here; exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--stack-dump-s", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.missing_wheels:
        print("\n".join(missing_wheels(args.missing_wheels)))
        return 0
    if args.child:
        if args.stack_dump_s:
            import faulthandler

            faulthandler.dump_traceback_later(args.stack_dump_s, exit=False)
        return child(args.child, args.out, args.dry_run)

    names = [n for n in args.steps.split(",") if n]
    unknown = sorted(set(names) - set(STEPS))
    if unknown:
        ap.error(f"unknown steps {unknown}; known: {', '.join(STEPS)}")
    out = args.out.resolve()
    shutil.rmtree(out / "steps", ignore_errors=True)
    (out / "steps").mkdir(parents=True)
    start = time.monotonic()
    records = []
    for name in names:
        left = args.budget_s - (time.monotonic() - start)
        limit = min(DRY_RUN_LIMIT_S if args.dry_run else STEPS[name][1], left)
        if limit < 15:
            records.append({"step": name, "status": "skipped", "seconds": 0, "limit_s": 0, "checks": [],
                            "failed_checks": [], "error": f"the budget of {args.budget_s:.0f} s was spent"})
            continue
        print(f"== {name} (limit {limit:.0f} s): {STEPS[name][2]}", flush=True)
        record = run_one(name, limit, out, args.dry_run)
        records.append(record)
        print(f"== {name}: {record['status']} in {record['seconds']} s", flush=True)
    total = round(time.monotonic() - start, 1)
    header = (f"GPU check{' (DRY RUN: CPU, Triton interpreter, tiny shapes; figures mean nothing)' if args.dry_run else ''}"
              f", {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {total} s; "
              f"`python scripts/gpu_check.py{' --dry-run' if args.dry_run else ''} --steps {','.join(names)}`")
    summary = {"dry_run": args.dry_run, "total_s": total, "budget_s": args.budget_s, "steps": records,
               "ok": all(r["status"] == "ok" for r in records)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = report(records, header)
    (out / "report.md").write_text(text)
    if args.bundle:
        with tarfile.open(out / "steps.tar.gz", "w:gz") as tar:
            tar.add(out / "steps", arcname="steps")
        shutil.rmtree(out / "steps")
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
