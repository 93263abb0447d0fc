"""The PromQL that deploy/ ships, read out of its files, and the series the server exports.

Three places hold queries: the Grafana dashboard (panel targets and the `model` variable), the
prometheus-adapter rules the HPA scales on, and the alert rules. The static checks (test_deploy_monitoring.py,
test_deploy_alerts.py) and the live one (test_deploy_prometheus_live.py) read them through these functions, so
all of them check the same expressions, substituted the same way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lmservice.metrics import Metrics
from tests.deploy.deploy_support import DEPLOY, K8S, load_yaml

DASHBOARD = DEPLOY / "grafana/dashboards/lmservice.json"
ADAPTER_CONFIG = K8S / "prometheus-adapter/config.yaml"
ALERTS = DEPLOY / "prometheus/alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus/alerts_test.yml"
METRIC = re.compile(r"\blmservice_[a-zA-Z0-9_:]+")
# Grafana's variables as the live check fills them: every model, and a rate window that holds several scrapes
# of the test's Prometheus (Grafana itself makes $__rate_interval at least four scrape intervals).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}
# What the HPA asks prometheus-adapter for: the pods of the Deployment, in its namespace.
HPA_NAMESPACE = "lmservice"


def exported_series(exposition: str) -> dict[str, set[str]]:
    """sample name -> label names, from Prometheus text format parsed by prometheus_client's parser."""
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def registry_series() -> dict[str, set[str]]:
    """Every sample a fresh server exports, labelled metrics included: each gets one child so that its
    samples appear (a labelled metric with no child exports none)."""
    metrics = Metrics()
    for collector in vars(metrics).values():
        labelnames = getattr(collector, "_labelnames", ())
        if labelnames:
            collector.labels(**dict.fromkeys(labelnames, "x"))
    return exported_series(generate_latest(metrics.registry).decode())


def dashboard_queries(dashboard: dict | None = None) -> list[tuple[str, str, str]]:
    """(panel title, PromQL expression, legend format) of every target, plus the template variables' queries
    (titled `$name`), of `dashboard` (the shipped one by default)."""
    dashboard = dashboard if dashboard is not None else json.loads(DASHBOARD.read_text())
    queries = [(panel["title"], target["expr"], target.get("legendFormat", ""))
               for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append((f"${variable['name']}", variable["definition"], ""))
    return queries


_LABEL_VALUES = re.compile(r"label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>\w+)\s*\)")


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression as Prometheus evaluates it once Grafana has filled its variables; a variable's
    `label_values(selector, label)` becomes the query whose series carry those values."""
    match = _LABEL_VALUES.fullmatch(expr.strip())
    if match:
        return f"count by ({match['label']}) ({match['selector']})"
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def adapter_rules() -> list[dict]:
    return load_yaml(ADAPTER_CONFIG)["rules"]


def adapter_series_name(rule: dict) -> str:
    """The metric a rule's seriesQuery selects (what the adapter puts in <<.Series>>)."""
    return METRIC.search(rule["seriesQuery"])[0]


def adapter_to_promql(rule: dict, pods: list[str]) -> str:
    """A rule's metricsQuery as prometheus-adapter renders it when the HPA asks for `pods` of HPA_NAMESPACE:
    the series, matchers on the resource labels of the rule's overrides, grouped by the pod label."""
    overrides = {spec["resource"]: label for label, spec in rule["resources"]["overrides"].items()}
    matchers = f'{overrides["namespace"]}="{HPA_NAMESPACE}",{overrides["pod"]}=~"{"|".join(pods)}"'
    return (rule["metricsQuery"].replace("<<.Series>>", adapter_series_name(rule))
            .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", overrides["pod"]))


def alert_rules(groups: dict | None = None) -> list[dict]:
    """Every rule of the alert rules file (or of `groups`, a rules file's content)."""
    groups = groups if groups is not None else load_yaml(ALERTS)
    return [rule for group in groups["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def write_rules(path: Path, exprs: list[str]) -> Path:
    """A rules file with one recording rule per expression (for `promtool check rules`)."""
    rules = [{"record": f"lmservice_check:{i}", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(json.dumps({"groups": [{"name": "lmservice_queries", "rules": rules}]}))
    return path
