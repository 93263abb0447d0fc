"""Tracing as operators switch it on: `lmservice serve --otlp-traces-endpoint URL` exports its spans over
OTLP/HTTP to a collector (here a stdlib HTTP server that decodes the protobuf ExportTraceServiceRequest);
without the flag the OpenTelemetry SDK is never imported; with the flag and without the otel extra,
start-up fails at once with one line naming the install command."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests.servers import API_KEY, ROOT, start_server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def value(v: AnyValue):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind)


class Collector(ThreadingHTTPServer):
    """POST /v1/traces: every span received, as (resource attributes, span)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[tuple[dict, Span]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1/traces"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout_s: float = 30.0) -> list[tuple[dict, Span]]:
        deadline = time.monotonic() + timeout_s
        while len(self.spans) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.spans


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
            self.server.spans.extend((resource, span) for scope in resource_spans.scope_spans for span in scope.spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def collector():
    server = Collector()
    yield server
    server.shutdown()
    server.server_close()


def test_serve_exports_spans_over_otlp_http(model_dirs, tmp_path_factory, collector, monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "lmservice-under-test")  # the standard variables reach the SDK
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: export at once rather than every 5 s
    srv = start_server(model_dirs, tmp_path_factory, "otlp", "--api-key", API_KEY,
                       "--otlp-traces-endpoint", collector.url)
    try:
        resp = httpx.post(srv.url + "/v1/completions", timeout=60, json={"model": "tr", "prompt": "Hi", "max_tokens": 3},
                          headers={"Authorization": f"Bearer {API_KEY}",
                                   "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        assert resp.status_code == 200
        httpx.get(srv.url + "/health", timeout=10)
        spans = collector.wait_for(1)
    finally:
        assert srv.stop() == 0
    assert len(spans) == 1, spans
    resource, span = spans[0]
    attrs = {a.key: value(a.value) for a in span.attributes}
    usage = resp.json()["usage"]
    assert resource["service.name"] == "lmservice-under-test"
    assert span.name == "text_completion tr" and span.kind == Span.SPAN_KIND_SERVER
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID
    assert span.status.code == Status.STATUS_CODE_UNSET
    assert attrs["gen_ai.response.model"] == attrs["lmservice.adapter"] == "tr"
    assert attrs["gen_ai.request.id"] == resp.json()["id"]
    assert attrs["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.completion_tokens"] == usage["completion_tokens"] == 3
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    assert 0 <= attrs["gen_ai.latency.time_to_first_token"] <= attrs["gen_ai.latency.e2e"]
    assert "gen_ai.prompt" not in attrs


# A process that builds the app both ways and reports which tracing modules it imported each time.
IMPORTS = """
import json, sys
from lmservice.api.app import create_app
from lmservice.config import Settings

def tracing_modules():
    return sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter",
                                                         "lmservice.api.tracing")))

def middleware(app):
    return [m.cls.__name__ for m in app.user_middleware]

off = create_app(Settings())
report = {"off": tracing_modules(), "off_middleware": middleware(off)}
on = create_app(Settings(otlp_traces_endpoint="http://127.0.0.1:9/v1/traces"))
report.update(on=tracing_modules(), on_middleware=middleware(on))
print(json.dumps(report))
"""


def test_without_the_flag_nothing_of_the_sdk_is_imported():
    out = subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["off"] == [] and "TracingMiddleware" not in report["off_middleware"]
    # Negative control: the same process with the flag imports them and traces.
    assert "lmservice.api.tracing" in report["on"] and "opentelemetry.sdk.trace" in report["on"]
    assert report["on_middleware"][0] == "TracingMiddleware"


def test_without_the_extra_serve_fails_at_once_with_one_line():
    # `None` in sys.modules makes the import fail as if the SDK were not installed (the API is fastapi's).
    code = "import sys; sys.modules['opentelemetry.sdk'] = None; from lmservice.cli import main; sys.exit(main())"
    out = subprocess.run([sys.executable, "-c", code, "serve", "--port", "0", "--model", "/nonexistent",
                          "--otlp-traces-endpoint", "http://127.0.0.1:9/v1/traces"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1, lines  # before the model (which does not exist) is looked at
    line = json.loads(lines[0])
    assert line["level"] == "error" and "missing: opentelemetry.sdk" in line["error"]
    assert "pip install 'lmservice[otel]'" in line["error"] and "pip install -e '.[otel]'" in line["error"]
