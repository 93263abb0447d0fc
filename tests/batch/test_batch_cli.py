"""`lmservice batch` end to end, as a subprocess on the random-weight models of tests/conftest.py: its answers
are a real server's (greedy), bad lines are one error line each and the run goes on, a run killed with
SIGKILL and run again answers every custom_id exactly once, and a full queue is waited out."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from lmservice.cli import main
from tests.servers import API_KEY, AUTH, ROOT

GOOD = {  # custom_id -> (url, body): every endpoint a batch takes, answered 200
    "cmpl": ("/v1/completions", {"model": "base", "prompt": "a b c", "max_tokens": 6, "temperature": 0}),
    "cmpl-list": ("/v1/completions", {"model": "base", "prompt": ["one", "two three"], "max_tokens": 4, "n": 2,
                                      "temperature": 0, "echo": True}),
    "cmpl-lora": ("/v1/completions", {"model": "tr", "prompt": "hello", "max_tokens": 8, "temperature": 0,
                                      "stream": False}),
    "chat": ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 5, "temperature": 0}),
    "embd": ("/v1/embeddings", {"model": "base", "input": ["a dog", "a cat runs"], "encoding_format": "float"}),
    "cls": ("/v1/classify", {"model": "cls", "text": ["good", "bad film"]}),
    "tr": ("/v1/translate", {"model": "tr", "text": ["A dog.", "Two men."], "max_tokens": 5}),
}
REFUSED = {  # custom_id -> (url, body, status): the server's own error answers
    "bad-param": ("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": -3}, 400),
    "bad-schema": ("/v1/completions", {"model": "base", "prompt": "x", "temperature": "hot"}, 422),
    "no-model": ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404),
    "too-big": ("/v1/completions", {"model": "base", "prompt": "x" * 70_000}, 413),  # --max-body-bytes 65536
    "cls-as-lm": ("/v1/embeddings", {"model": "cls", "input": "x"}, 400),
}
MALFORMED = [  # (line, error code): never reach the server
    (b"this is not json", "invalid_json_line"),
    (b'{"custom_id": "m-url", "method": "POST", "url": "/v1/models", "body": {}}', "unsupported_url"),
    (b'{"custom_id": "m-method", "method": "GET", "url": "/v1/completions", "body": {}}', "unsupported_method"),
    (b'{"custom_id": "m-body", "method": "POST", "url": "/v1/completions"}', "missing_required_parameter"),
    (b'{"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}', "missing_required_parameter"),
    (b'{"custom_id": "m-stream", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", '
     b'"stream": true}}', "streaming_unsupported"),
    (b'{"custom_id": "cmpl", "method": "POST", "url": "/v1/completions", "body": {"prompt": "again"}}',
     "duplicate_custom_id"),
]


def _entry(custom_id: str, url: str, body: dict) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


def batch_command(model_dirs: dict[str, Path], input_path: Path, output_path: Path, *flags: str) -> list[str]:
    """The flags of tests/servers.py's ServerProcess, so that both answer from the same engine settings."""
    return [sys.executable, "-m", "lmservice.cli", "batch", "-i", str(input_path), "-o", str(output_path),
            "--model", str(model_dirs["base"]), "--served-model-name", "base", "--adapters-dir",
            str(model_dirs["adapters"]), "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "512", *flags]


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run_batch(model_dirs, input_path: Path, output_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(batch_command(model_dirs, input_path, output_path, *flags), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def mixed(model_dirs, tmp_path_factory):
    """One run on a file mixing good, refused and malformed lines (with a blank line among them)."""
    tmp = tmp_path_factory.mktemp("batch_mixed")
    lines = [_entry(cid, url, body) for cid, (url, body) in GOOD.items()]
    lines += [line for line, _ in MALFORMED[:3]] + [b""]
    lines += [_entry(cid, url, body) for cid, (url, body, _) in REFUSED.items()]
    lines += [line for line, _ in MALFORMED[3:]]
    (tmp / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    proc = run_batch(model_dirs, tmp / "in.jsonl", tmp / "out.jsonl", "--concurrency", "8",
                     "--api-key", API_KEY, "--max-body-bytes", "65536")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return {"lines": lines, "records": records(tmp / "out.jsonl"), "stdout": proc.stdout}


def _comparable(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created", "data", "results")}


def test_answers_are_the_servers(mixed, server):
    """Greedy: the same bodies sent to `lmservice serve` get the same answers (ids and times aside)."""
    by_id = {r["custom_id"]: r for r in mixed["records"] if r["error"] is None}
    for custom_id, (url, body) in GOOD.items():
        expected = httpx.post(server.url + url, json=body, headers=AUTH, timeout=120)
        record = by_id[custom_id]
        assert record["response"]["status_code"] == expected.status_code == 200, record
        got, want = record["response"]["body"], expected.json()
        assert _comparable(got) == _comparable(want), custom_id
        if url == "/v1/embeddings":
            assert [d["index"] for d in got["data"]] == [0, 1]
            for a, b in zip(got["data"], want["data"], strict=True):
                assert torch.allclose(torch.tensor(a["embedding"]), torch.tensor(b["embedding"]), atol=1e-5)
        if url == "/v1/classify":
            assert [r["label"] for r in got["results"]] == [r["label"] for r in want["results"]]
            for a, b in zip(got["results"], want["results"], strict=True):
                assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
        assert record["response"]["request_id"], "the X-Request-ID the app gave the line"
    assert by_id["cmpl"]["response"]["body"]["usage"]["completion_tokens"] == 6
    for custom_id, (url, body, status) in REFUSED.items():
        expected = httpx.post(server.url + url, json=body, headers=AUTH, timeout=120)
        record = by_id[custom_id]
        assert record["response"]["status_code"] == expected.status_code == status, record
        assert record["response"]["body"] == expected.json()  # the server's own error body, word for word


def test_each_bad_line_is_one_error_line_and_the_run_goes_on(mixed):
    out = mixed["records"]
    # every non-blank line answered once: the good and refused lines after the malformed ones too
    assert len(out) == len([line for line in mixed["lines"] if line])
    assert all(r["id"].startswith("batch_req_") for r in out) and len({r["id"] for r in out}) == len(out)
    errors = sorted((r["error"]["line"], r["error"]["code"]) for r in out if r["error"] is not None)
    line_numbers = {line: i + 1 for i, line in enumerate(mixed["lines"])}
    assert errors == sorted((line_numbers[line], code) for line, code in MALFORMED)
    for r in out:
        assert (r["response"] is None) == (r["error"] is not None)
    duplicate = next(r for r in out if r["error"] and r["error"]["code"] == "duplicate_custom_id")
    assert duplicate["custom_id"] == "cmpl"
    assert f"batch done: {len(out)} lines answered" in mixed["stdout"]
    assert f"({len(GOOD)} ok, {len(REFUSED) + len(MALFORMED)} failed" in mixed["stdout"]


def _signal_mid_file(model_dirs, tmp_path: Path, num_lines: int, after_lines: int,
                     sig: int) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """A batch of `num_lines` greedy completions (16 tokens each, 4 at a time, so it takes a while), sent `sig`
    once `after_lines` answers are written; (input, output, the finished process)."""
    input_path, output_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_path.write_bytes(b"".join(
        _entry(f"q{i}", "/v1/completions", {"model": "base", "prompt": f"w{i} x", "max_tokens": 16,
                                            "temperature": 0, "ignore_eos": True}) + b"\n"
        for i in range(num_lines)))
    proc = subprocess.Popen(batch_command(model_dirs, input_path, output_path, "--concurrency", "4"), cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if output_path.exists() and output_path.read_bytes().count(b"\n") >= after_lines:
                break
            time.sleep(0.01)
        proc.send_signal(sig)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    written = output_path.read_bytes().count(b"\n")
    assert after_lines <= written < num_lines, f"the signal must land mid-file ({written} of {num_lines} written)"
    return input_path, output_path, subprocess.CompletedProcess(proc.args, proc.returncode, stdout)


def test_a_run_killed_mid_file_resumes_without_redoing_lines(model_dirs, tmp_path):
    num_lines = 300
    input_path, output_path, _ = _signal_mid_file(model_dirs, tmp_path, num_lines, 20, signal.SIGKILL)
    written = output_path.read_bytes().count(b"\n")
    with open(output_path, "ab") as f:  # as if the kill had cut a write short
        f.write(b'{"id": "batch_req_0", "custom_id": "q1')

    second = run_batch(model_dirs, input_path, output_path, "--concurrency", "16")
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"; {written} answered by an earlier run" in second.stdout
    out = records(output_path)
    assert sorted(r["custom_id"] for r in out) == sorted(f"q{i}" for i in range(num_lines))
    for r in out:
        assert r["error"] is None and r["response"]["status_code"] == 200, r
        assert r["response"]["body"]["usage"]["completion_tokens"] == 16
    # greedy: the same prompt gives the same text in either run
    texts = {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in out}
    third = run_batch(model_dirs, input_path, tmp_path / "again.jsonl", "--concurrency", "64")
    assert third.returncode == 0
    assert {r["custom_id"]: r["response"]["body"]["choices"][0]["text"]
            for r in records(tmp_path / "again.jsonl")} == texts


def test_a_full_queue_is_waited_out(model_dirs, tmp_path):
    """--max-waiting-requests 2 under 16 lines at once: lines refused with 429 are sent again once others
    finish (the summary counts them: without any, this test would show nothing); a line larger than the
    bound on its own gets the server's 400 at once instead of waiting for ever."""
    input_path, output_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [_entry(f"q{i}", "/v1/completions", {"model": "base", "prompt": f"w{i}", "max_tokens": 4})
             for i in range(40)]
    lines.append(_entry("big", "/v1/completions", {"model": "base", "prompt": ["a", "b", "c"], "max_tokens": 2}))
    input_path.write_bytes(b"\n".join(lines) + b"\n")
    proc = run_batch(model_dirs, input_path, output_path, "--concurrency", "16", "--max-waiting-requests", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    by_id = {r["custom_id"]: r["response"] for r in records(output_path)}
    assert len(by_id) == 41
    big = by_id.pop("big")
    assert big["status_code"] == 400 and "--max-waiting-requests" in big["body"]["error"]["message"]
    assert {response["status_code"] for response in by_id.values()} == {200}
    num_retries = re.search(r"; (\d+) sent again after a 429\)", proc.stdout)
    assert num_retries and int(num_retries.group(1)) > 0, proc.stdout


def test_unusable_files_exit_2_before_loading_anything(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["batch", "-i", str(missing), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    same = tmp_path / "in.jsonl"
    same.write_text("")
    assert main(["batch", "-i", str(same), "-o", str(same)]) == 2
    assert "must not be the input file" in capsys.readouterr().err
    foreign = tmp_path / "notes.txt"
    foreign.write_text('my notes\n{"id": "x", "custom_id": "a"}\n')
    assert main(["batch", "-i", str(same), "-o", str(foreign)]) == 2
    assert "not a batch output record" in capsys.readouterr().err
    assert main(["batch", "-i", str(same), "-o", str(tmp_path / "o.jsonl"), "--concurrency", "0"]) == 2


def test_sigterm_exits_1_leaving_whole_records(model_dirs, tmp_path):
    """The process side of SIGTERM: exit 1, whole lines, every record a 200 (that the lines in flight at
    the signal are the ones finished is tests/batch/test_runner.py's, where the signal's moment is known)."""
    _, output_path, proc = _signal_mid_file(model_dirs, tmp_path, 300, 10, signal.SIGTERM)
    assert proc.returncode == 1 and "stopped early" in proc.stdout
    assert output_path.read_bytes().endswith(b"\n")  # whole lines only
    out = records(output_path)
    assert len({r["custom_id"] for r in out}) == len(out)
    assert all(r["response"]["status_code"] == 200 for r in out)


def test_the_documented_batch_file_runs_on_the_shipped_models(tmp_path):
    """docs/api.md's example input, answered line for line by the shipped models/."""
    text = (ROOT / "docs" / "api.md").read_text()
    block = re.search(r"^```jsonl\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert block, "docs/api.md shows no batch input file"
    (tmp_path / "requests.jsonl").write_text(block.group(1))
    command = [sys.executable, "-m", "lmservice.cli", "batch", "-i", str(tmp_path / "requests.jsonl"),
               "-o", str(tmp_path / "results.jsonl")]
    proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    inputs = [json.loads(line) for line in block.group(1).splitlines()]
    out = {r["custom_id"]: r for r in records(tmp_path / "results.jsonl")}
    assert sorted(out) == sorted(entry["custom_id"] for entry in inputs)
    assert all(r["response"]["status_code"] == 200 for r in out.values())
