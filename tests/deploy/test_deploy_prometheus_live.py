"""A real Prometheus (Debian's 2.42) scrapes a real `lmservice serve` under a short mixed load, and answers every
query that deploy/ ships: the Grafana dashboard's panels and variable, the prometheus-adapter rule the HPA
scales on (rendered as the adapter renders it), and the alert rules (loaded from prometheus.yml's rule_files).

Without the prometheus binary (scripts/install_ci_tools.sh unpacks it from Debian's package) the tests skip with
the reason, and fail under CI=true, like the other deploy checks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.deploy.prometheus_support import (
    POD,
    SCRAPE_INTERVAL_S,
    PrometheusProcess,
    check_answers,
    config_for,
    prometheus_binary,
)
from tests.deploy.promql_support import (
    DASHBOARD,
    adapter_rules,
    adapter_to_promql,
    alert_rules,
    dashboard_queries,
    grafana_to_promql,
    metric_names,
)
from tests.servers import ADMIN_KEY, AUTH

LOAD_ROUNDS = 4


def one_round_of_load(url: str) -> None:
    """Every kind of work, concurrently (so engine steps batch several requests): generate on the base model,
    a completion on the translate adapter, a streamed completion, classify, embeddings, and two 4xx (an unknown
    model; an adapter that cannot be loaded, which is also what the adapter-failure alert watches)."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    calls = [
        ("/v1/generate", {"prompt": "one two three", "max_tokens": 8, "ignore_eos": True}, AUTH, 200),
        ("/v1/completions", {"model": "tr", "prompt": "a dog", "max_tokens": 6, "ignore_eos": True}, AUTH, 200),
        ("/v1/classify", {"model": "cls", "text": ["a b c", "d e"]}, AUTH, 200),
        ("/v1/embeddings", {"model": "base", "input": "a dog runs"}, AUTH, 200),
        ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, AUTH, 404),
        ("/v1/adapters", {"name": "missing", "path": "no-such-adapter"}, admin, 400),
    ]

    def post(call: tuple[str, dict, dict, int]) -> None:
        path, body, headers, status = call
        reply = httpx.post(url + path, json=body, headers=headers, timeout=60)
        assert reply.status_code == status, f"{path}: {reply.status_code} {reply.text}"

    def stream() -> None:
        body = {"prompt": "streamed", "max_tokens": 12, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60) as reply:
            assert reply.status_code == 200
            assert "data: [DONE]" in list(reply.iter_lines())

    with ThreadPoolExecutor(len(calls) + 1) as pool:
        futures = [pool.submit(post, call) for call in calls] + [pool.submit(stream)]
        for future in futures:
            future.result()


@pytest.fixture(scope="module")
def prometheus(request, tmp_path_factory) -> Iterator[PrometheusProcess]:
    """Prometheus scraping the shared test server every second, after the load (its counters moved between
    scrapes, so every rate over the dashboard's window is above zero)."""
    prometheus_binary()  # skips (fails under CI=true) before starting a server for nothing
    server = request.getfixturevalue("server")
    prom = PrometheusProcess(config_for(server.url), tmp_path_factory.mktemp("prometheus")).wait_ready()
    try:
        # A scrape before any load: the counters have their starting point in the TSDB.
        prom.wait_for_scrape_after(0.0)
        # The first round creates the labelled series (per model, status, endpoint); the next rounds move them
        # after Prometheus has seen them once.
        for _ in range(LOAD_ROUNDS):
            one_round_of_load(server.url)
            prom.wait_for_scrape_after(time.time())
        # One more scrape, and the rules evaluated on it.
        prom.wait_for_scrape_after(time.time() + SCRAPE_INTERVAL_S)
        yield prom
    finally:
        prom.stop()


def live_dashboard_queries(dashboard: dict | None = None) -> list[tuple[str, str]]:
    return [(title, grafana_to_promql(expr)) for title, expr, _ in dashboard_queries(dashboard)]


def test_every_dashboard_query_answers_with_finite_data(prometheus: PrometheusProcess) -> None:
    problems = check_answers(prometheus, live_dashboard_queries())
    assert not problems, "\n".join(problems)
    [variable] = [expr for title, expr in live_dashboard_queries() if title == "$model"]
    assert {"base", "tr", "cls"} <= {s["metric"].get("model") for s in prometheus.query(variable)}


def test_a_panel_on_a_renamed_metric_fails_the_check(prometheus: PrometheusProcess) -> None:
    """Negative control: the same check on a copy of the dashboard with one metric renamed names that panel."""
    text = DASHBOARD.read_text()
    broken = json.loads(text.replace("lmservice_kv_cache_usage_perc", "lmservice_kv_cache_usage_percent"))
    problems = check_answers(prometheus, live_dashboard_queries(broken))
    assert len(problems) == 1 and problems[0].startswith("KV-cache usage: no data"), problems


def check_adapter_rule(prometheus: PrometheusProcess, rule: dict) -> list[str]:
    """Problems with a prometheus-adapter rule for the HPA's pods: the adapter discovers the series with
    seriesQuery, then asks metricsQuery for the pods and maps each result to a pod by its pod label, so each pod
    must get exactly one finite value."""
    name = rule["name"]["as"]
    series = prometheus.api("series", **{"match[]": rule["seriesQuery"]})
    problems = [] if [s.get("pod") for s in series] == [POD] else [f"{name}: seriesQuery finds {series}"]
    expr = adapter_to_promql(rule, [POD])
    problems += check_answers(prometheus, [(name, expr)])
    pods = [s["metric"].get("pod") for s in prometheus.query(expr)]
    if pods != [POD]:
        problems.append(f"{name}: values for pods {pods}, not [{POD!r}]: {expr}")
    return problems


def test_the_hpa_metric_as_prometheus_adapter_serves_it(prometheus: PrometheusProcess) -> None:
    for rule in adapter_rules():
        problems = check_adapter_rule(prometheus, rule)
        assert not problems, "\n".join(problems)
        [sample] = prometheus.query(adapter_to_promql(rule, [POD]))
        assert sample["value"] >= 0


def test_an_adapter_rule_that_loses_the_pod_label_fails_the_check(prometheus: PrometheusProcess) -> None:
    """Negative control: without `by (<<.GroupBy>>)` the value is there but belongs to no pod."""
    [rule] = adapter_rules()
    broken = {**rule, "metricsQuery": rule["metricsQuery"].replace(" by (<<.GroupBy>>)", "")}
    assert broken != rule
    problems = check_adapter_rule(prometheus, broken)
    assert len(problems) == 1 and "values for pods [None]" in problems[0], problems


def test_alert_rules_evaluate_on_live_data(prometheus: PrometheusProcess) -> None:
    """Prometheus loads the shipped rules and evaluates every one without error; the metrics they query are all
    scraped; the adapter-failure alert fires on the failed POST /v1/adapters of the load, and no critical alert
    is pending or firing on a healthy server."""
    [group] = prometheus.api("rules", type="alert")["groups"]
    assert {r["name"] for r in group["rules"]} == {r["alert"] for r in alert_rules()}
    for rule in group["rules"]:
        assert rule["health"] == "ok", f"{rule['name']}: {rule['health']} {rule.get('lastError')}"
    scraped = {s["metric"]["__name__"] for s in prometheus.query('count by (__name__) ({__name__=~"lmservice_.+"})')}
    for rule in alert_rules():
        assert metric_names(rule["expr"]) <= scraped, rule["alert"]

    def active() -> dict[str, list[dict]]:
        alerts: dict[str, list[dict]] = {}
        for alert in prometheus.api("alerts")["alerts"]:
            alerts.setdefault(alert["labels"]["alertname"], []).append(alert)
        return alerts

    prometheus.wait_until(lambda: "LmserviceAdapterLoadFailed" in active(), 10.0, "alerting on the adapter failure")
    [failed] = active()["LmserviceAdapterLoadFailed"]
    assert failed["state"] == "firing" and failed["labels"]["pod"] == POD
    critical = {r["alert"] for r in alert_rules() if r["labels"]["severity"] == "critical"}
    assert not critical & set(active()), active()
