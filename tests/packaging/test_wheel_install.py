"""The wheel installs beside other people's packages: into a fresh virtual environment that already holds
Hugging Face's `kernels` package and the newest transformers our ranges allow, it serves generate, classify
and translate on the shipped models, imported from site-packages (never from this checkout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
NEIGHBOURS = ["kernels==0.19.1", "transformers<6"]  # HF's `kernels` is a dependency of transformers >= 5.25


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
         cwd=out)
    (path,) = out.glob("lmservice-*.whl")
    return path


def test_the_wheel_holds_one_top_level_package_and_its_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"lmservice"}
    assert any(n.startswith("lmservice/kernels/_native/") and n.endswith(".so") for n in names), \
        "no native kernel library was built into the wheel"
    assert "lmservice/kernels/csrc/cpu_kernels.h" in names


@pytest.mark.timeout(1200)
def test_installed_beside_hf_kernels_and_newest_transformers_it_serves(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # The neighbours first, as a user's environment would already hold them; torch is the one we test.
    _run([*pip, "torch==2.13.0", *NEIGHBOURS], cwd=tmp_path)
    _run([*pip, str(wheel)], cwd=tmp_path)
    python = str(venv / "bin" / "python")
    where = json.loads(_run([python, "-c", "import json, kernels, lmservice, transformers; print(json.dumps("
                                          "[kernels.__file__, lmservice.__file__, transformers.__version__]))"],
                            cwd=tmp_path))
    assert "site-packages" in where[0] and "site-packages" in where[1] and str(REPO) not in where[1]

    port = free_port()
    models = REPO / "models"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(venv / "bin" / "lmservice"), "serve", "--model", str(models / "base"), "--served-model-name", "base",
         "--adapter", f"sentiment={models / 'sentiment'}", "--adapter", f"translate-en-de={models / 'translate-en-de'}",
         "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items()
                                                                  if k not in ("PYTHONPATH", "VIRTUAL_ENV")})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the installed server never became ready"
            time.sleep(0.5)
        generated = httpx.post(f"{url}/v1/generate", json={"prompt": "once upon a time", "max_tokens": 8}, timeout=60)
        assert generated.status_code == 200 and generated.json()["text"], generated.text
        classified = httpx.post(f"{url}/v1/classify", json={"text": ["a wonderful film ."]}, timeout=60)
        assert classified.status_code == 200, classified.text
        assert set(classified.json()["results"][0]["scores"]) == {"negative", "positive"}
        translated = httpx.post(f"{url}/v1/translate", json={"text": "A dog runs.", "source": "en", "target": "de"},
                                timeout=60)
        assert translated.status_code == 200 and translated.json()["translations"][0]["text"], translated.text
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
