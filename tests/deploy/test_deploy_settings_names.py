"""Every LMSERVICE_* variable and `lmservice serve` flag that the deployment files use is a real setting,
and every value they give parses into Settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmservice.config import Settings
from tests.deploy.deploy_support import (
    COMPOSE_FILES,
    DEPLOY,
    REPO,
    compose_document,
    dockerfile_env,
    find,
    kustomizations,
    kustomize_build,
    settings_env_names,
    settings_flags,
)

DEPLOY_FILES = [REPO / "Dockerfile", *COMPOSE_FILES, *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]
_ENV_NAME = re.compile(r"\bLMSERVICE_[A-Z0-9_]+\b")
# A shell command line `lmservice serve ...` (in the README, the Dockerfile), continuation lines joined.
_SERVE_COMMAND = re.compile(r"\blmservice serve\b([^\n|;&#`]*)")


def _files_mentioning(pattern: re.Pattern[str]) -> dict[Path, set[str]]:
    found = {}
    for path in DEPLOY_FILES:
        names = set(pattern.findall(path.read_text()))
        if names:
            found[path] = names
    return found


# Read by the native kernels themselves (lmservice/kernels/cpu_native.py), which know nothing of the service's Settings.
KERNEL_ENV_NAMES = {"LMSERVICE_KERNEL_CACHE", "LMSERVICE_PREBUILT_KERNELS"}


def test_every_lmservice_variable_is_a_setting() -> None:
    kernels_source = (REPO / "lmservice" / "kernels" / "cpu_native.py").read_text()
    assert all(f'"{name}"' in kernels_source for name in KERNEL_ENV_NAMES)
    known = settings_env_names() | KERNEL_ENV_NAMES
    used = _files_mentioning(_ENV_NAME)
    assert used, "the deployment files set no LMSERVICE_* variable at all"
    unknown = {str(p.relative_to(REPO)): sorted(n - known) for p, n in used.items() if n - known}
    assert not unknown, f"not fields of lmservice.config.Settings: {unknown}"


def _flags(words: list[str]) -> set[str]:
    return {w.split("=")[0] for w in words if w.startswith("--")}


def _serve_commands() -> dict[str, list[list[str]]]:
    """Arguments after `serve` in shell lines of every deploy file, in the compose services' commands and in
    the containers of every built kustomization."""
    commands: dict[str, list[list[str]]] = {}
    for path in DEPLOY_FILES:
        text = path.read_text().replace("\\\n", " ")
        found = [line.split() for line in _SERVE_COMMAND.findall(text)]
        commands[str(path.relative_to(REPO))] = found
    for path in COMPOSE_FILES:
        for service in compose_document(path)["services"].values():
            argv = [*(service.get("entrypoint") or []), *(service.get("command") or [])]
            if "serve" in argv:
                commands[str(path.relative_to(REPO))].append(argv[argv.index("serve") + 1:])
    for directory in kustomizations():
        for resource in kustomize_build(directory):
            for container in _containers(resource):
                argv = [*container.get("command", []), *container.get("args", [])]
                if "serve" in argv:
                    commands.setdefault(str(directory.relative_to(REPO)), []).append(argv[argv.index("serve") + 1:])
    return commands


def _containers(resource: dict) -> list[dict]:
    spec = resource.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def test_every_serve_flag_is_a_setting() -> None:
    known = settings_flags() | {"--help"}
    unknown = {}
    for where, argvs in _serve_commands().items():
        flags = set().union(*map(_flags, argvs)) if argvs else set()
        if flags - known:
            unknown[where] = sorted(flags - known)
    assert not unknown, f"`lmservice serve` has no such flags: {unknown}"


def test_serve_flag_check_sees_commands() -> None:
    """The check above reads real commands: the Deployment's and the README's."""
    commands = _serve_commands()
    assert any(where.startswith("deploy/k8s/overlays") for where, argvs in commands.items() if argvs)
    assert commands["deploy/README.md"], "deploy/README.md shows no `lmservice serve` command"


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in settings_env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if name.startswith("LMSERVICE_"):
            monkeypatch.setenv(name, str(value))
    return Settings()


def test_dockerfile_environment_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings_from(dockerfile_env(), monkeypatch)
    assert settings.host == "0.0.0.0"
    assert set(settings.adapter_dirs()) == {"sentiment", "translate-en-de"}


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_environment_parses(compose_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The base file's values, overridden by this file's (how compose merges -f files).
    env = {**dockerfile_env(), **compose_document()["services"]["lmservice"]["environment"],
           **(compose_document(compose_file)["services"]["lmservice"].get("environment") or {})}
    settings = _settings_from(env, monkeypatch)
    assert settings.host == "0.0.0.0"
    # Interpolated with nothing set: no admin key (admin endpoints off), no API keys (open).
    assert settings.admin_key is None and settings.api_key == []


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_configmap_parses(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = find(kustomize_build(DEPLOY / "k8s" / "overlays" / overlay), "ConfigMap")
    settings = _settings_from({**dockerfile_env(), **config["data"]}, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.device == ("cuda" if overlay == "gpu" else "cpu")


def _train_commands() -> dict[str, list[str]]:
    """argv after `train` of the compose job and of each built fine-tuning Job."""
    commands = {}
    for path in COMPOSE_FILES:
        for name, service in compose_document(path)["services"].items():
            argv = [*(service.get("entrypoint") or []), *(service.get("command") or [])]
            if "train" in argv:
                commands[f"{path.name}:{name}"] = argv[argv.index("train") + 1:]
    for directory in kustomizations():
        for resource in kustomize_build(directory):
            for container in _containers(resource):
                argv = [*container.get("command", []), *container.get("args", [])]
                if "train" in argv:
                    commands[f"{directory.relative_to(REPO)}:{container['name']}"] = argv[argv.index("train") + 1:]
    return commands


def _job_has_flags(job: str) -> bool:
    import argparse
    import importlib

    from lmservice.train.cli import JOBS

    parser = argparse.ArgumentParser(add_help=False)
    importlib.import_module(JOBS[job][0]).add_arguments(parser)
    return bool(parser._actions)  # noqa: SLF001


def test_train_commands_parse_with_the_train_cli() -> None:
    from lmservice.train.cli import build_parser

    commands = _train_commands()
    assert {"docker-compose.yml:finetune", "deploy/k8s/overlays/gpu/finetune:train"} <= set(commands)
    parser = build_parser()
    for where, argv in commands.items():
        if not _job_has_flags(argv[0]):
            pytest.skip(f"`lmservice train {argv[0]}` declares no flags yet (the job is being written)")
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `lmservice train {' '.join(argv)}` does not parse")
        assert args.lora and str(args.output).startswith("/adapters/"), where
