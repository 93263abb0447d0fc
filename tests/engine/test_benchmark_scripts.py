"""The engine benchmarks run end to end on a tiny model (their figures are measured elsewhere, never here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmservice.kernels.cpu_native import native_library

REPO = Path(__file__).resolve().parents[2]


def _table_rows(args: list[str]) -> list[list[str]]:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.strip("|").split("|") for line in proc.stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # past the header and the --- line


def test_profile_step_accounts_for_every_step():
    rows = _table_rows(["benchmarks/profile_step.py", "--shape", "tiny", "--batch", "1", "3", "--steps", "2",
                        "--prompt-len", "8", "--threads", "1", "--cpu-kernels", "torch", "native"])
    assert [tuple(r[:3]) for r in rows] == [(dtype, batch, backend) for dtype in ("float32", "int8")
                                            for batch in ("1", "3") for backend in ("torch", "native")]
    for row in rows:
        wall = float(row[3])
        shares = [float(cell.split()[0]) for cell in row[4:]]
        assert wall > 0 and all(s >= 0 for s in shares)
        # the groups plus "Python and scheduling" cover the step (each cell is rounded to 0.1 ms)
        assert sum(shares) >= wall - 0.05 * len(shares)


def test_closed_loop_reports_throughput():
    rows = _table_rows(["benchmarks/engine.py", "--shape", "tiny", "--closed-loop", "--concurrency", "1", "2",
                        "--new-tokens", "4", "--prompt-len", "8", "--dtypes", "float32", "--force-token", "7",
                        "--kv-cache-dtypes", "auto", "int8", "--rounds", "2"])
    runs = [("float32", kv, c) for kv in ("auto", "int8") for c in ("1", "2")]
    assert [tuple(r[:4]) for r in rows] == [(*run, "1") for run in runs] + [(*run, "2") for run in runs[::-1]]
    assert all(float(r[4]) > 0 for r in rows)


def test_native_step_compares_both_paths():
    """benchmarks/native_step.py: a row per row count (linears) and per dtype and batch (steps), every cell timed;
    int8 steps only where the library has the int8 kernel (AVX-512 VNNI), as the engine would run them."""
    lib = native_library()
    if lib is None:
        pytest.skip("no native kernels built for this CPU (no C compiler at install time)")
    rows = [r for r in _table_rows(["benchmarks/native_step.py", "--shape", "tiny", "--rows", "1", "5", "--batch", "1",
                                    "3", "--rounds", "1", "--prompt-len", "8", "--threads", "1"])
            if r[0] != "dtype" and not r[0].startswith("---")]  # the second table's header
    linear_rows, step_rows = rows[:2], rows[2:]
    assert [r[0] for r in linear_rows] == ["1", "5"]
    assert all(float(cell.split()[0]) > 0 for r in linear_rows for cell in r[1:4])
    assert all((r[4] != "-") == lib.has_int8 for r in linear_rows)
    dtypes = ("float32", "int8") if lib.has_int8 else ("float32",)
    assert [(r[0], r[1]) for r in step_rows] == [(d, b) for d in dtypes for b in ("1", "3")]
    assert all(float(r[4]) > 0 for r in step_rows)


def test_beam_benchmark_scores_each_width():
    """benchmarks/beam.py on the shipped translator and the first Multi30k val sentences."""
    if not (REPO.parent / "shared" / "data" / "multi30k" / "val.en").exists():
        pytest.skip("no Multi30k data beside the repository (../shared/data)")
    rows = _table_rows(["benchmarks/beam.py", "--limit", "6", "--beams", "1", "2", "--threads", "1"])
    assert [r[0] for r in rows] == ["1", "2"]
    for row in rows:
        assert 0 <= float(row[1]) <= 100 and float(row[5]) > 0
    assert float(rows[0][7]) == 1.0 and float(rows[1][7]) > 1.5  # two beams decode about twice the rows


def test_read_floor_compares_each_format_with_its_bytes():
    rows = _table_rows(["benchmarks/read_floor.py", "--shape", "tiny", "--context", "8", "--steps", "2",
                        "--repeats", "1", "--threads", "1", "--dtypes", "float32", "int8", "int4"])
    assert [r[0] for r in rows] == ["float32", "int8", "int4"]
    mib = [float(r[1].split()[0]) for r in rows]
    assert mib[0] > mib[1] > mib[2] > 0  # fewer bytes per step in each narrower format
    for row in rows:  # (a tiny model's floor rounds to 0.00 ms: only signs here)
        floor, step, ratio = float(row[2]), float(row[3]), float(row[4])
        assert floor >= 0 and step > 0 and ratio > 0


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "tinystories" / "valid.txt").exists(),
                    reason="needs ../shared/data (TinyStories validation)")
def test_speculative_benchmark_compares_on_and_off():
    rows = _table_rows(["benchmarks/speculative.py", "--workloads", "stories", "--concurrency", "1", "--rounds", "1",
                        "--requests-per-slot", "1", "--threads", "1"])
    assert [r[:2] for r in rows] == [["stories", "1"]]
    off, on, ratio = float(rows[0][2]), float(rows[0][3]), float(rows[0][4])
    assert off > 0 and on > 0 and abs(ratio - on / off) < 0.01 + 0.01 * ratio
    assert rows[0][7].endswith("%")  # guesses were made and counted
