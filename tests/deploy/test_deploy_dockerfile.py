"""Dockerfile: hadolint clean, and the image's contract with the server (user, port, probes, entry point)."""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy.deploy_support import REPO, dockerfile_env, run, tool

DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of every instruction, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.MULTILINE)]


@pytest.fixture(scope="module")
def runtime() -> list[tuple[str, str]]:
    """Instructions of the final stage."""
    steps = instructions(DOCKERFILE.read_text())
    starts = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(starts) >= 2, "the Dockerfile must be multi-stage"
    return steps[starts[-1]:]


def test_hadolint_reports_nothing() -> None:
    # Every rule left unapplied is a `# hadolint ignore=` line with the reason above it in the Dockerfile.
    result = run(tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_hadolint_ignore_has_a_reason() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], \
                f"line {i + 1}: explain the ignored rule in a comment above it"


def test_runs_as_a_numeric_non_root_user(runtime: list[tuple[str, str]]) -> None:
    users = [arg for op, arg in runtime if op == "USER"]
    assert users, "no USER in the final stage"
    uid = users[-1].split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) != 0
    assert f"runAsUser: {uid}" in (REPO / "deploy/k8s/base/deployment.yaml").read_text()


def test_entry_point_is_lmservice_serve(runtime: list[tuple[str, str]]) -> None:
    ops = dict(runtime)
    assert ops["ENTRYPOINT"] == '["lmservice"]'
    assert ops["CMD"] == '["serve"]'


def test_healthcheck_probes_health_on_the_configured_port(runtime: list[tuple[str, str]]) -> None:
    check = dict(runtime)["HEALTHCHECK"]
    assert "/health" in check and "LMSERVICE_PORT" in check
    env = dockerfile_env()
    exposed = dict(runtime)["EXPOSE"]
    assert exposed == env["LMSERVICE_PORT"]


def test_serves_on_all_interfaces_with_baked_models_and_volumes(runtime: list[tuple[str, str]]) -> None:
    env = dockerfile_env()
    # The server's own default is 127.0.0.1: unreachable from outside a container.
    assert env["LMSERVICE_HOST"] == "0.0.0.0"
    volumes = dict(runtime)["VOLUME"]
    assert "/models" in volumes and env["LMSERVICE_ADAPTERS_DIR"] in volumes
    assert env["LMSERVICE_MODEL"].startswith("/models/")
    assert any(op == "COPY" and arg.endswith("models/ /models/") for op, arg in runtime)


def test_caches_point_at_the_writable_cache_mount() -> None:
    # The root filesystem is read-only in Kubernetes and compose; /cache is an emptyDir / tmpfs there.
    env = dockerfile_env()
    for name in ("XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR"):
        assert env[name].startswith("/cache"), name


def test_build_context_keeps_what_the_image_copies() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for op, arg in instructions(DOCKERFILE.read_text()):
        if op == "COPY" and "--from" not in arg:
            sources = [a for a in arg.split() if not a.startswith("--")][:-1]
            for source in sources:
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


def test_baked_models_are_the_shipped_ones() -> None:
    """LMSERVICE_MODEL and LMSERVICE_ADAPTER name directories that `COPY models/ /models/` really brings."""
    env = dockerfile_env()
    if not (REPO / "models/base/config.json").exists():
        pytest.skip("models/base is not in the repository yet (made by the training jobs)")
    assert env["LMSERVICE_MODEL"] == "/models/base"
    for item in json.loads(env["LMSERVICE_ADAPTER"]):
        name, _, path = item.partition("=")
        local = REPO / "models" / path.removeprefix("/models/")
        assert (local / "adapter_config.json").is_file(), f"adapter {name}: {local} is not a PEFT adapter"
