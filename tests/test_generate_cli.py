"""`lmservice generate` on the command line, through the real console script."""

from __future__ import annotations

import os
import subprocess
import sys

from transformers import AutoTokenizer


def run_cli(*args: str) -> str:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-m", "lmservice.cli", "generate", *args], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    return out.stdout


def test_generate_greedy_streams_prompt_and_completion(tiny_model_dir, tiny_engine):
    from lmservice.engine.sampling_params import SamplingParams
    from tests.helpers import run_to_completion

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = tiny_engine()
    expected = run_to_completion(engine, [("a", tok.encode("hello"), SamplingParams(temperature=0, max_tokens=6))])
    stdout = run_cli("--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "6", "hello")
    assert stdout == "hello" + expected["a"]["text"][0] + "\n"


def test_generate_batch_with_n_and_logprobs(tiny_model_dir):
    stdout = run_cli("--model", str(tiny_model_dir), "--max-tokens", "3", "--n", "2", "--temperature", "1",
                     "--sample-seed", "5", "--logprobs", "2", "one", "two")
    for header in ("--- prompt 0, completion 0 ---", "--- prompt 0, completion 1 ---",
                   "--- prompt 1, completion 0 ---", "--- prompt 1, completion 1 ---"):
        assert header in stdout
    logprob_lines = [line for line in stdout.splitlines() if line.startswith("  '")]
    assert 4 <= len(logprob_lines) <= 12  # one per generated token (a sequence may stop at EOS)


def test_generate_beam_search_prints_the_n_best(tiny_model_dir, tiny_engine):
    from lmservice.engine.sampling_params import SamplingParams
    from tests.helpers import run_to_completion

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    params = SamplingParams(temperature=0, max_tokens=5, num_beams=3, n=2, early_stopping=True, length_penalty=0.5)
    expected = run_to_completion(tiny_engine(), [("a", tok.encode("hello"), params)])["a"]["text"]
    stdout = run_cli("--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "5", "--num-beams", "3",
                     "--n", "2", "--early-stopping", "true", "--length-penalty", "0.5", "hello")
    assert stdout == "".join(f"--- prompt 0, completion {i} ---\nhello{expected[i]}\n" for i in range(2))
