"""docker-compose.yml: valid against the Compose schema, and in step with the server and the other deploy files."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import jsonschema
import pytest

from lmservice.config import Settings
from tests.deploy.deploy_support import (
    COMPOSE_FILES,
    COMPOSE_SCHEMA,
    DEPLOY,
    REPO,
    compose_document,
    dockerfile_env,
    load_yaml,
    missing,
)


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_document()


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_matches_the_compose_schema(path: Path) -> None:
    if not COMPOSE_SCHEMA.exists():
        missing("the Compose JSON schema")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.validate(compose_document(path), schema)


def test_schema_check_rejects_a_misspelt_key(compose: dict) -> None:
    if not COMPOSE_SCHEMA.exists():
        missing("the Compose JSON schema")
    broken = json.loads(json.dumps(compose))
    broken["services"]["lmservice"]["environmnet"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(COMPOSE_SCHEMA.read_text()))


def test_services(compose: dict) -> None:
    services = compose["services"]
    assert {"lmservice", "prometheus", "grafana", "finetune"} <= set(services)
    # The fine-tuning job is one-shot, out of a plain `docker compose up`.
    assert services["finetune"]["profiles"] == ["finetune"]
    assert all("profiles" not in services[name] for name in ("lmservice", "prometheus", "grafana"))


def test_server_port_and_drain(compose: dict) -> None:
    server = compose["services"]["lmservice"]
    env = {**dockerfile_env(), **server["environment"]}
    port = int(env["LMSERVICE_PORT"])
    assert env["LMSERVICE_HOST"] == "0.0.0.0"
    assert any(p.rsplit(":", 1)[-1] == str(port) for p in server["ports"])
    grace = server["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > float(env["LMSERVICE_DRAIN_TIMEOUT_S"])


def test_prometheus_scrapes_the_server(compose: dict) -> None:
    server_port = {**dockerfile_env(), **compose["services"]["lmservice"]["environment"]}["LMSERVICE_PORT"]
    mounts = _bind_mounts(compose["services"]["prometheus"])
    config = load_yaml(mounts["/etc/prometheus/prometheus.yml"])
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "lmservice")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"lmservice:{server_port}"]


def test_prometheus_loads_the_alert_rules(compose: dict) -> None:
    """Every rule file prometheus.yml names (relative to its own directory) is mounted beside it."""
    mounts = _bind_mounts(compose["services"]["prometheus"])
    config_path = "/etc/prometheus/prometheus.yml"
    rule_files = load_yaml(mounts[config_path])["rule_files"]
    assert [mounts[str(PurePosixPath(config_path).parent / f)] for f in rule_files] == [DEPLOY / "prometheus/alerts.yml"]


def test_grafana_gets_the_provisioning_and_dashboard(compose: dict) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = load_yaml(provisioning / "datasources/prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = load_yaml(provisioning / "dashboards/lmservice.yml")["providers"][0]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / "lmservice.json").exists()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (mounts[str(Path(home).parent)] / Path(home).name).exists()


def test_finetune_writes_where_the_server_reads(compose: dict) -> None:
    services = compose["services"]
    server_env = {**dockerfile_env(), **services["lmservice"]["environment"]}
    adapters_dir = server_env["LMSERVICE_ADAPTERS_DIR"]
    server_volume = _named_volumes(services["lmservice"])[adapters_dir]
    job_volume = _named_volumes(services["finetune"])[adapters_dir]
    assert server_volume == (job_volume[0], "ro") and job_volume[1] != "ro"
    assert server_volume[0] in compose["volumes"]
    command = services["finetune"]["command"]
    assert command[command.index("--output") + 1].startswith(adapters_dir + "/")
    assert services["finetune"]["entrypoint"] == ["lmservice", "train"]


def test_named_volumes_are_declared(compose: dict) -> None:
    for name, service in compose["services"].items():
        for volume, _ in _named_volumes(service).values():
            assert volume in compose["volumes"], f"{name}: volume {volume} is not declared"


def test_read_only_containers_have_writable_caches(compose: dict) -> None:
    for name in ("lmservice", "finetune"):
        service = compose["services"][name]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        tmpfs = {entry.split(":")[0] for entry in service["tmpfs"]}
        assert {"/tmp", dockerfile_env()["XDG_CACHE_HOME"]} <= tmpfs


def test_gpu_override_asks_for_a_gpu() -> None:
    override = compose_document(COMPOSE_FILES[1])["services"]["lmservice"]
    assert override["environment"]["LMSERVICE_DEVICE"] == "cuda"
    devices = override["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    Settings(device=override["environment"]["LMSERVICE_DEVICE"])


def _bind_mounts(service: dict) -> dict[str, Path]:
    """container path -> host path (relative to the repository) of the service's bind mounts."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = REPO / source
            assert mounts[target].exists(), f"bind mount source {source} does not exist"
    return mounts


def _named_volumes(service: dict) -> dict[str, tuple[str, str]]:
    """container path -> (volume name, mode) of the service's named volumes."""
    named = {}
    for entry in service.get("volumes", []):
        parts = entry.split(":")
        if not parts[0].startswith((".", "/")):
            named[parts[1]] = (parts[0], parts[2] if len(parts) > 2 else "rw")
    return named


def test_bind_mount_helper_sees_the_deploy_dir(compose: dict) -> None:
    assert any(DEPLOY in p.parents for p in _bind_mounts(compose["services"]["grafana"]).values())
