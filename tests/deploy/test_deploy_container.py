"""The image, built and run for real with podman: read-only root, the non-root user, /ready, generate,
classify and translate on the baked-in default models, and the SIGTERM drain.

scripts/container_image.sh builds it (a local mmdebstrap base, torch from a local wheelhouse, PyPI for the
rest; layers cached between runs). podman, runc and mmdebstrap are Debian packages that not every machine
has, and building needs root: without them this module skips, saying which is missing (also in CI, whose
tool script does not install a container engine: a full image build is minutes of the CI budget).
LMSERVICE_CONTAINER_TESTS=0 skips it on a machine that has them.

Time to ready and the image size are printed (`pytest -s`) and recorded in deploy/README.md.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy.deploy_support import REPO

UID = "10001"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def image() -> dict[str, str]:
    if os.environ.get("LMSERVICE_CONTAINER_TESTS") == "0":
        pytest.skip("LMSERVICE_CONTAINER_TESTS=0")
    absent = [t for t in ("podman", "runc", "mmdebstrap") if shutil.which(t) is None]
    if absent:
        pytest.skip(f"no container engine here: {', '.join(absent)} not installed "
                    "(Debian packages podman, runc, mmdebstrap)")
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (rootless podman needs subuids and fuse-overlayfs)")
    start = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "scripts" / "container_image.sh")], capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, f"image build failed:\n{done.stderr[-4000:]}"
    facts = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    print(f"\nimage {facts['IMAGE']}: {int(facts['IMAGE_SIZE_BYTES']) / 1e6:.0f} MB, "
          f"script took {time.monotonic() - start:.0f} s")
    return facts


def wait_ready(url: str, check=lambda: None, timeout_s: float = 180) -> None:
    """Poll /ready until it answers 200; `check()` between tries may fail the test early."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        check()
        assert time.monotonic() < deadline, f"not ready in {timeout_s:.0f} s"
        time.sleep(0.2)


def podman(facts: dict[str, str], *args: str, timeout: float = 120, check: bool = True) -> str:
    env = {**os.environ, "CONTAINERS_CONF": facts["CONTAINERS_CONF"]}
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout.strip()


@pytest.fixture(scope="module")
def container(image):
    """The image as an operator runs it: read-only root, tmpfs caches, its own non-root user, a drain
    shorter than the test's patience. Host networking: this machine has no container network.
    NOTE: podman 4.3 ignores a tmpfs `mode=` here and refuses docker's `uid=`; `:U` chowns the tmpfs to
    the container's user."""
    port = _free_port()
    name = f"lmservice-test-{port}"
    start = time.monotonic()
    podman(image, "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp", "--tmpfs", "/cache:U",
           "--network", "host", "-e", f"LMSERVICE_PORT={port}", "-e", "LMSERVICE_HOST=127.0.0.1",
           "-e", "LMSERVICE_DRAIN_TIMEOUT_S=20", image["IMAGE"])
    url = f"http://127.0.0.1:{port}"
    try:
        def still_running() -> None:
            state = podman(image, "inspect", "--format", "{{.State.Status}}", name)
            assert state == "running", f"container {state}:\n{podman(image, 'logs', name, check=False)[-3000:]}"

        wait_ready(url, still_running)
        print(f"\ncontainer ready in {time.monotonic() - start:.1f} s (podman run to /ready 200)")
        yield {"name": name, "url": url, "facts": image}
    finally:
        podman(image, "rm", "-f", "-t", "0", name, check=False)


def test_runs_as_the_non_root_user_on_a_read_only_root(container):
    facts, name = container["facts"], container["name"]
    assert podman(facts, "exec", name, "id", "-u") == UID
    assert podman(facts, "inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", name) == "true"
    probe = "import pathlib; pathlib.Path('/opt/venv/x').write_text('x')"
    denied = subprocess.run(["podman", "exec", name, "python3", "-c", probe], capture_output=True, text=True,
                            env={**os.environ, "CONTAINERS_CONF": facts["CONTAINERS_CONF"]})
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr


def test_serves_generate_classify_and_translate_from_the_baked_in_models(container):
    url = container["url"]
    models = {m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
    assert models == {"base", "sentiment", "translate-en-de"}
    gen = httpx.post(url + "/v1/generate", json={"prompt": "once upon a time", "max_tokens": 12,
                                                 "ignore_eos": True}, timeout=60)
    assert gen.status_code == 200 and gen.json()["usage"]["completion_tokens"] == 12
    cls = httpx.post(url + "/v1/classify", json={"text": ["a charming film .", "a dull film ."]}, timeout=60)
    assert cls.status_code == 200
    results = cls.json()["results"]
    assert [sorted(r["scores"]) for r in results] == [["negative", "positive"]] * 2
    tr = httpx.post(url + "/v1/translate", json={"text": "Two dogs are playing in the snow.", "source": "en",
                                                 "target": "de"}, timeout=60)
    assert tr.status_code == 200
    assert tr.json()["translations"][0]["text"].strip()
    # the image's own healthcheck command passes
    facts = container["facts"]
    podman(facts, "healthcheck", "run", container["name"])


def test_sigterm_drains_the_stream_in_flight_then_exits_0(container):
    facts, name, url = container["facts"], container["name"], container["url"]
    lines: list[str] = []
    first = threading.Event()

    def stream() -> None:
        body = {"model": "base", "prompt": "the little dog", "max_tokens": 250, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                    first.set()

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert first.wait(60)
    podman(facts, "kill", "--signal", "TERM", name)
    assert "data: [DONE]" not in lines, "the stream ended before SIGTERM: the test proves nothing"
    reader.join(60)
    assert not reader.is_alive()
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # it finished, it was not cut
    assert podman(facts, "wait", name, timeout=60) == "0"


def test_dockerfile_build_args_keep_the_published_defaults():
    """The local-build args exist, and their defaults are what users elsewhere get."""
    text = (REPO / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert Path(REPO / "scripts" / "container_image.sh").is_file()


def test_podman_compose_serves_the_compose_files_lmservice(image):
    """docker-compose.yml's lmservice service under podman-compose, with deploy/compose/podman.yml's tmpfs
    mounts, its published port, read-only root and dropped capabilities."""
    compose = shutil.which("podman-compose")
    if compose is None:
        pytest.skip("podman-compose is not installed (pip install podman-compose)")
    port = _free_port()
    project = f"lmservice-test-{port}"
    env = {**os.environ, "CONTAINERS_CONF": image["CONTAINERS_CONF"], "PUBLISHED_PORT": str(port),
           "IMAGE_TAG": image["IMAGE"].rsplit(":", 1)[1]}
    files = ["-f", str(REPO / "docker-compose.yml"), "-f", str(REPO / "deploy" / "compose" / "podman.yml")]
    cmd = [compose, "-p", project, *files]
    up = subprocess.run([*cmd, "up", "-d", "--no-build", "lmservice"], capture_output=True, text=True, env=env,
                        timeout=300, cwd=REPO)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        cls = httpx.post(url + "/v1/classify", json={"text": "a charming film ."}, timeout=60)
        assert cls.status_code == 200 and cls.json()["model"] == "sentiment"
    finally:
        subprocess.run([*cmd, "down", "-t", "40"], capture_output=True, env=env, timeout=120, cwd=REPO)
