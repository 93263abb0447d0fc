"""The alert rules: valid for promtool, their unit tests pass and cover every alert both ways, they query only
what the server exports, and the Kubernetes PrometheusRule carries exactly the rules file's groups."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy.deploy_support import K8S, find, kustomize_build, load_yaml, run, tool
from tests.deploy.promql_support import ALERTS, ALERTS_TEST, alert_rules, metric_names, registry_series

SERVING_OVERLAYS = [K8S / "overlays/cpu", K8S / "overlays/gpu"]


def promtool_test_rules(directory: Path) -> str:
    """`promtool test rules alerts_test.yml` in `directory` (the test file names alerts.yml relative to itself);
    the output when it fails, "" when it passes."""
    result = run(tool("promtool"), "test", "rules", "alerts_test.yml", cwd=directory)
    return "" if result.returncode == 0 else result.stdout + result.stderr


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    """The rules file, and the PrometheusRule's groups as the operator hands them to Prometheus."""
    result = run(tool("promtool"), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    for overlay in SERVING_OVERLAYS:
        rule = find(kustomize_build(overlay), "PrometheusRule")
        path = tmp_path / f"{overlay.name}.yml"
        path.write_text(yaml.safe_dump(rule["spec"]))
        result = run(tool("promtool"), "check", "rules", str(path))
        assert result.returncode == 0, f"{overlay}: {result.stdout}{result.stderr}"


def test_unit_tests_pass() -> None:
    failures = promtool_test_rules(ALERTS.parent)
    assert not failures, failures


def test_unit_tests_fail_when_an_alert_breaks(tmp_path: Path) -> None:
    """Negative control: the unit tests notice a rule that queries a renamed metric (it never fires)."""
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    broken = ALERTS.read_text().replace("lmservice_batch_size_count", "lmservice_batch_size_total")
    assert broken != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    failures = promtool_test_rules(tmp_path)
    assert "LmserviceEngineStalled" in failures
    assert "LmserviceKVCacheFull" not in failures


def test_unit_tests_cover_every_alert_firing_and_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - firing == set(), "alerts no unit test makes fire"
    assert alerts - silent == set(), "alerts no unit test checks silent"


def test_rules_query_only_exported_metrics() -> None:
    exported = set(registry_series())
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names or "up{" in rule["expr"], rule["alert"]
        assert names <= exported, f"{rule['alert']}: {sorted(names - exported)} not exported"


def test_every_alert_says_how_bad_and_what_happened() -> None:
    for rule in alert_rules():
        assert rule["alert"].startswith("Lmservice"), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


@pytest.mark.parametrize("overlay", SERVING_OVERLAYS, ids=lambda p: p.name)
def test_prometheusrule_carries_the_rules_file(overlay: Path) -> None:
    resources = kustomize_build(overlay)
    rule = find(resources, "PrometheusRule")
    assert rule["spec"] == load_yaml(ALERTS), "deploy/k8s/base/prometheusrule.yaml's spec must equal alerts.yml"
    # Picked up by the same Prometheus as the ServiceMonitor (kube-prometheus-stack selects both by `release`).
    monitor = find(resources, "ServiceMonitor")
    assert rule["metadata"]["labels"]["release"] == monitor["metadata"]["labels"]["release"]
    assert rule["metadata"]["namespace"] == monitor["metadata"]["namespace"]
