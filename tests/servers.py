"""Real servers for the tests that need one (tests/api, tests/deploy, tests/web): `lmservice serve` in a
subprocess on a free port, the random-weight models it serves (a tiny GPT-2 with a LoRA translate
adapter and a LoRA classify adapter), and clients' helpers: /metrics parsed, SSE split, a stream read
in the background. The fixtures built on them are in tests/conftest.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN_KEY = "admin-key"
LABELS = ["negative", "positive"]
TRANSLATE_CARD = {"task": "translate", "prompt_template": "English: {text}\nGerman:",
                  "languages": {"source": "en", "target": "de"}}


def make_adapter(base_dir: Path, out_dir: Path, classifier: bool, seed: int) -> Path:
    """A PEFT LoRA adapter with non-zero weights (PEFT starts B at zero) and its model card."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    if classifier:
        model = GPT2ForSequenceClassification.from_pretrained(base_dir, num_labels=len(LABELS), pad_token_id=0)
    else:
        model = GPT2LMHeadModel.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                        modules_to_save=["score"] if classifier else None,
                        task_type="SEQ_CLS" if classifier else "CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(out_dir)
    card = {"task": "classify", "labels": LABELS} if classifier else TRANSLATE_CARD
    (out_dir / "lmservice.json").write_text(json.dumps(card))
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m lmservice.cli serve ...` on a free port; logs go to a file the tests can read."""

    def __init__(self, model_dirs: dict[str, Path], log_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        args = [sys.executable, "-m", "lmservice.cli", "serve", "--model", str(model_dirs["base"]),
                "--served-model-name", "base", "--adapters-dir", str(model_dirs["adapters"]),
                "--port", str(self.port), "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "512", *flags]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout_s}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        self.terminate()
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc


def start_server(model_dirs, tmp_path_factory, name: str, *flags: str) -> ServerProcess:
    return ServerProcess(model_dirs, tmp_path_factory.mktemp(name) / "server.log", *flags).wait_ready()


def metric_samples(url: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=headers or {}, timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_kv_idle(url: str, timeout_s: float = 10.0) -> float:
    """Poll until the engine's used KV blocks are back to 0 (idle); return the last usage fraction."""
    deadline = time.monotonic() + timeout_s
    usage = -1.0
    while time.monotonic() < deadline:
        usage = metric_samples(url)[("lmservice_kv_cache_usage_perc", ())]
        if usage == 0.0:
            return usage
        time.sleep(0.05)
    return usage


def sse_events(raw: bytes) -> list[str]:
    """Split an event stream by the spec: events end with a blank line; each of ours is one `data:` line."""
    text = raw.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [e[len("data: "):] for e in events]


class StreamInBackground:
    """A streaming completion read to its end in a thread; `started` is set at the first event."""

    def __init__(self, url: str, body: dict) -> None:
        self.started = threading.Event()
        self.chunks: list[dict] = []
        self.status: int | None = None
        self.done = False  # the stream's closing `data: [DONE]` arrived
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict) -> None:
        with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions", headers=AUTH,
                                                      json={**body, "stream": True,
                                                            "stream_options": {"include_usage": True}}) as resp:
            self.status = resp.status_code
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    self.chunks.append(json.loads(line[6:]))
                    self.started.set()
                self.done = self.done or line == "data: [DONE]"
                if self._stop.is_set():
                    return  # hang up: the server aborts the request

    def hang_up(self) -> None:
        self._stop.set()
        self.thread.join(30)

    def text(self) -> str:
        return "".join(c["choices"][0]["text"] for c in self.chunks if c["choices"])

    def finish_reason(self) -> str | None:
        return [c["choices"][0]["finish_reason"] for c in self.chunks if c["choices"]][-1]
