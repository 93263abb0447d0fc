"""A real Prometheus for the tests: Debian's `prometheus` binary (scripts/install_ci_tools.sh unpacks it into the
virtual environment) with deploy/prometheus/prometheus.yml pointed at a test server, and the checks that run
the shipped PromQL through its HTTP API.

Its config is the shipped one with the test's changes only: one-second scrapes and rule evaluation, the
lmservice job's target set to the test server, the alert rules loaded by absolute path, and the target labels
`namespace` and `pod` that the Prometheus Operator adds through the ServiceMonitor on Kubernetes (the adapter
rule selects on them).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml

from tests.deploy.deploy_support import DEPLOY, VENV_BIN, load_yaml, missing
from tests.deploy.promql_support import ALERTS, HPA_NAMESPACE
from tests.servers import free_port

SCRAPE_INTERVAL_S = 1.0
# The pod the test's target stands for: what the ServiceMonitor's pod label would be.
POD = "lmservice-test-0"


def prometheus_binary() -> str:
    path = shutil.which("prometheus", path=str(VENV_BIN)) or shutil.which("prometheus")
    if path is None:
        missing("prometheus (the binary of Debian's prometheus package, unpacked into .venv/bin)")
    return path


def config_for(server_url: str) -> dict:
    """deploy/prometheus/prometheus.yml, scraping `server_url` every second (see the module docstring)."""
    config = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    config["global"].update(scrape_interval=f"{SCRAPE_INTERVAL_S:g}s", evaluation_interval=f"{SCRAPE_INTERVAL_S:g}s")
    config["rule_files"] = [str(ALERTS.parent / f) for f in config["rule_files"]]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "lmservice")
    [static] = job["static_configs"]
    static["targets"] = [urlsplit(server_url).netloc]
    static["labels"] = {**static.get("labels", {}), "namespace": HPA_NAMESPACE, "pod": POD}
    # Prometheus' self-scrape points at its compose address; the test needs only lmservice.
    config["scrape_configs"] = [job]
    return config


class PrometheusProcess:
    """`prometheus` on a free port with its storage in `workdir`; stopped (SIGTERM, then SIGKILL) by stop()."""

    def __init__(self, config: dict, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [prometheus_binary(), f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 30.0) -> PrometheusProcess:
        self.wait_until(lambda: httpx.get(self.url + "/-/ready", timeout=2).status_code == 200, timeout_s, "ready")
        return self

    def wait_until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if condition():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus: not {what} after {timeout_s}s\n{self.log()}")

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>: the `data` of a successful answer; an error answer raises PromQLError."""
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        if reply["status"] != "success":
            raise PromQLError(f"{reply.get('errorType')}: {reply.get('error')}")
        return reply["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query at now, as a list of {"metric": labels, "value": float} (a scalar is one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": float(data["result"][1])}]
        if data["resultType"] != "vector":
            raise PromQLError(f"a {data['resultType']} result, not an instant vector")
        return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]

    def last_scrape_s(self) -> float:
        """Unix time of the last scrape of the lmservice job (0 before the first)."""
        samples = self.query('timestamp(up{job="lmservice"} == 1)')
        return max((s["value"] for s in samples), default=0.0)

    def wait_for_scrape_after(self, unix_s: float, timeout_s: float = 20.0) -> None:
        self.wait_until(lambda: self.last_scrape_s() > unix_s, timeout_s, f"scraped lmservice after {unix_s}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class PromQLError(Exception):
    """Prometheus refused a query (bad syntax, a range vector where an instant one is needed, ...)."""


def check_answers(prometheus: PrometheusProcess, queries: list[tuple[str, str]]) -> list[str]:
    """Problems with (title, PromQL) pairs evaluated now: an error, no series at all, or a value that is not a
    finite number (histogram_quantile over no observations is NaN, a ratio of zero rates too)."""
    problems = []
    for title, expr in queries:
        try:
            samples = prometheus.query(expr)
        except PromQLError as e:
            problems.append(f"{title}: {e}: {expr}")
            continue
        if not samples:
            problems.append(f"{title}: no data: {expr}")
        for sample in samples:
            if not math.isfinite(sample["value"]):
                problems.append(f"{title}: {sample['value']} for {sample['metric']}: {expr}")
    return problems
