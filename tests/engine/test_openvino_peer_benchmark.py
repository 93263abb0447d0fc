"""benchmarks/engine.py --closed-loop --openvino: OpenVINO GenAI rows beside lmservice's, on the very same prompts."""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import engine as bench
from benchmarks.common import SHAPES, closed_loop_prompt_ids
from benchmarks.openvino_peer import OpenVINOPeer
from tests.engine.test_benchmark_scripts import _table_rows
from tests.helpers import make_gpt2_dir


def test_openvino_spec_names_the_precisions_to_ask_for():
    assert OpenVINOPeer.parse("/x/m-int8") == OpenVINOPeer(Path("/x/m-int8"))
    assert OpenVINOPeer.parse("/x/m:u8:f32").properties(2) == {"INFERENCE_NUM_THREADS": 2, "KV_CACHE_PRECISION": "u8",
                                                              "INFERENCE_PRECISION_HINT": "f32"}
    assert OpenVINOPeer.parse("/x/m::f32").properties(0) == {"INFERENCE_PRECISION_HINT": "f32"}
    with pytest.raises(argparse.ArgumentTypeError, match="DIR"):
        OpenVINOPeer.parse("/x/m:u8:f32:extra")


def test_openvino_rows_get_lmservice_prompts_in_the_same_rounds(monkeypatch, capsys):
    """Both runners are replaced by recorders: per concurrency, OpenVINO is handed exactly lmservice's prompts,
    and its rows take part in the reversed round too."""
    calls = []

    def lmservice(model_dir, dtype, prompts, concurrency, new_tokens, force_token, kv):
        calls.append(("lmservice", concurrency, prompts))
        return 1.0

    def openvino(peer, prompts, concurrency, new_tokens, threads):
        calls.append(("openvino", concurrency, prompts))
        return 2.0, "u8", "f32"

    monkeypatch.setattr(bench, "run_engine_closed_loop", lmservice)
    monkeypatch.setattr(bench, "run_openvino_closed_loop", openvino)
    monkeypatch.setattr("sys.argv", ["engine.py", "--shape", "tiny", "--closed-loop", "--concurrency", "1", "3",
                                     "--prompt-len", "5", "--new-tokens", "2", "--dtypes", "float32",
                                     "--openvino", "/nowhere/m-int8:u8:f32", "--rounds", "2"])
    bench.main()

    order = [("lmservice", 1), ("lmservice", 3), ("openvino", 1), ("openvino", 3)]
    assert [(who, c) for who, c, _ in calls] == order + order[::-1]
    for c in (1, 3):
        expected = closed_loop_prompt_ids(c, 5, SHAPES["tiny"]["vocab_size"])
        assert len(expected) == max(4, 2 * c) and all(len(p) == 5 for p in expected)
        assert all(prompts == expected for _, cc, prompts in calls if cc == c)
    assert closed_loop_prompt_ids(1, 5, 1000) != closed_loop_prompt_ids(3, 5, 1000)[:4]  # the check can fail
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| openvino")]
    assert rows[0] == "| openvino m-int8 (u8 KV, f32) | u8 | 1 | 1 | 2.0 |"


@pytest.mark.skipif(importlib.util.find_spec("openvino_genai") is None or shutil.which("optimum-cli") is None,
                    reason="needs openvino_genai here and an optimum-cli (optimum-intel) on PATH to export the model")
def test_openvino_closed_loop_runs_on_a_tiny_export(tmp_path):
    """The tiny model engine.py builds (same seed), exported as ../shared/PEERS.md says, run beside lmservice."""
    make_gpt2_dir(tmp_path / "hf", seed=0, **SHAPES["tiny"])
    subprocess.run(["optimum-cli", "export", "openvino", "--model", str(tmp_path / "hf"), "--task",
                    "text-generation-with-past", "--weight-format", "fp32", str(tmp_path / "m-fp32")],
                   check=True, capture_output=True, timeout=600)
    rows = _table_rows(["benchmarks/engine.py", "--shape", "tiny", "--closed-loop", "--concurrency", "1", "3",
                        "--new-tokens", "4", "--prompt-len", "8", "--dtypes", "float32", "--threads", "1",
                        "--openvino", f"{tmp_path / 'm-fp32'}:f32:f32"])
    assert [(r[0], r[1], r[2]) for r in rows] == [("float32", "auto", "1"), ("float32", "auto", "3"),
                                                  ("openvino m-fp32 (f32 KV, f32)", "f32", "1"),
                                                  ("openvino m-fp32 (f32 KV, f32)", "f32", "3")]
    assert all(float(r[4]) > 0 for r in rows)
