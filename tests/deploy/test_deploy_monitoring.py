"""Prometheus config, Grafana dashboard and the prometheus-adapter rule: valid for their tools, and they only
query metrics (and labels) that the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from tests.deploy.deploy_support import DEPLOY, load_yaml, run, tool
from tests.deploy.promql_support import (
    DASHBOARD,
    METRIC,
    adapter_rules,
    adapter_series_name,
    adapter_to_promql,
    dashboard_queries,
    exported_series,
    grafana_to_promql,
    registry_series,
    write_rules,
)

_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# Labels every series has once scraped (Prometheus' own), besides the server's.
_SCRAPE_LABELS = {"job", "instance", "le"}


def check_queries_against(series: dict[str, set[str]]) -> list[str]:
    """Problems: metrics the server does not export, labels those metrics do not carry."""
    problems = []
    for title, expr, legend in dashboard_queries():
        names = set(METRIC.findall(expr))
        if not names:
            problems.append(f"{title}: queries no lmservice metric: {expr}")
        for name in names - set(series):
            problems.append(f"{title}: {name} is not exported")
        available = set().union(*(series.get(n, set()) for n in names)) | _SCRAPE_LABELS
        used = {label.strip() for group in _BY.findall(expr) for label in group.split(",") if label.strip()}
        used |= set(_MATCHER.findall(expr)) | set(_LEGEND.findall(legend))
        if expr.startswith("label_values("):
            used.add(expr.rstrip(")").rsplit(",", 1)[1].strip())
        for label in used - available:
            problems.append(f"{title}: label {label!r} is not on {sorted(names)}")
    return problems


def test_prometheus_config_passes_promtool() -> None:
    result = run(tool("promtool"), "check", "config", str(DEPLOY / "prometheus/prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_only_what_the_server_exports() -> None:
    problems = check_queries_against(registry_series())
    assert not problems, "\n".join(problems)


def test_dashboard_queries_only_what_a_live_server_exports(server) -> None:
    """The same check against a real server's /metrics, after traffic that gives every labelled metric a
    child; and the live exposition carries exactly the series lmservice.metrics registers."""
    from tests.servers import API_KEY

    reply = httpx.post(server.url + "/v1/generate", json={"prompt": "one two", "max_tokens": 3, "ignore_eos": True},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert reply.status_code == 200, reply.text
    live = exported_series(httpx.get(server.url + "/metrics", timeout=30).text)
    problems = check_queries_against(live)
    assert not problems, "\n".join(problems)

    def ours(series: dict[str, set[str]]) -> dict[str, set[str]]:
        return {n: labels for n, labels in series.items() if n.startswith("lmservice_") and not n.endswith("_created")}

    assert ours(live) == ours(registry_series())


def test_the_check_catches_a_wrong_name_and_label() -> None:
    series = registry_series()
    # Without the counter's _total suffix, and with a label the histogram does not have, the check must fail.
    series.pop("lmservice_requests_total")
    series["lmservice_time_to_first_token_seconds_bucket"] = {"le"}
    problems = "\n".join(check_queries_against(series))
    assert "lmservice_requests_total is not exported" in problems
    assert "label 'model'" in problems


def test_dashboard_has_the_operators_panels() -> None:
    """One panel (at least) per signal the issue names, found by the metric it plots."""
    exprs = " ".join(expr for _, expr, _ in dashboard_queries())
    for needle in (
        "sum by (endpoint, model) (rate(lmservice_requests_total",        # request rate by endpoint, adapter
        'lmservice_requests_total{status=~"[45]..',                        # errors by status
        "histogram_quantile(0.99, sum by (le) (rate(lmservice_time_to_first_token_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(lmservice_inter_token_latency_seconds_bucket",
        "rate(lmservice_generation_tokens_total",                          # tokens/s
        "lmservice_num_requests_running", "lmservice_num_requests_waiting",
        "lmservice_kv_cache_usage_perc",
        "lmservice_prefix_cache_hits_total",
        "lmservice_num_preemptions_total",
    ):
        assert needle in exprs, needle


def test_dashboard_datasource_is_provisioned() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    provisioned = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert [d["type"] for d in provisioned] == ["prometheus"] and provisioned[0]["isDefault"] is True


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each dashboard and adapter query (as a recording rule's expression)."""
    exprs = [grafana_to_promql(expr) for _, expr, _ in dashboard_queries()]
    for rule in adapter_rules():
        exprs.append(adapter_to_promql(rule, ["lmservice-0", "lmservice-1"]))
        exprs.append(rule["seriesQuery"])
    result = run(tool("promtool"), "check", "rules", str(write_rules(tmp_path / "rules.yml", exprs)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_adapter_rule_serves_an_exported_gauge() -> None:
    series = registry_series()
    for rule in adapter_rules():
        name = adapter_series_name(rule)
        assert name in series, name
        assert re.fullmatch(rule["name"]["matches"], name)
        # The overrides map exactly the labels the ServiceMonitor adds, onto the objects the HPA asks about.
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


@pytest.mark.parametrize("path", sorted((DEPLOY / "grafana/provisioning").rglob("*.yml")), ids=lambda p: p.name)
def test_grafana_provisioning_files_are_version_1(path: Path) -> None:
    assert load_yaml(path)["apiVersion"] == 1
