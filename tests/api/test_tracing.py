"""Tracing (lmservice/api/tracing.py) through the SDK's in-memory exporter: one SERVER span per request to a
generating endpoint, whose attributes say what the answer said (usage, finish reasons, ids), whose latencies
add up, whose parent is the caller's `traceparent`, with an error status when the request failed (after its
200 too, and 499 when the client dropped its stream), and without prompt text unless --otlp-trace-prompts
(even when --log-prompts puts it in the request's record). In process: Starlette's TestClient runs the
app's lifespan, so a real engine serves the tiny random model."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import ValidationError

from lmservice.api.app import create_app
from lmservice.api.tracing import RequestTracing
from lmservice.config import Settings
from tests.servers import sse_events

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
PROMPT = "Seven quiet herons"  # never in a span unless asked for


def _traced_app(model_dirs, trace_prompts: bool, log_prompts: bool = False):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(model=model_dirs["base"], served_model_name="base", adapters_dir=model_dirs["adapters"],
                        device="cpu", dtype="float32", num_kv_blocks=64, otlp_trace_prompts=trace_prompts,
                        log_prompts=log_prompts)
    return TestClient(create_app(settings, tracing=RequestTracing(provider, trace_prompts))), exporter


@pytest.fixture(scope="module")
def traced(model_dirs):
    client, exporter = _traced_app(model_dirs, trace_prompts=False)
    with client:
        yield client, exporter


@pytest.fixture
def app(traced):
    client, exporter = traced
    exporter.clear()
    return client, exporter


def only_span(exporter):
    spans = exporter.get_finished_spans()
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


def answer(resp) -> dict:
    """The JSON answer, or for a stream its events merged: the last usage and every finish reason."""
    if not resp.headers["content-type"].startswith("text/event-stream"):
        return resp.json()
    events = [json.loads(e) for e in sse_events(resp.content)[:-1]]
    return {"id": events[0]["id"], "usage": events[-1]["usage"],
            "finish_reasons": [e["finish_reason"] for e in events if e.get("finish_reason")]}


def finish_reasons(body: dict) -> list[str] | None:
    if "finish_reasons" in body:
        return body["finish_reasons"]
    if "choices" in body:
        return [c["finish_reason"] for c in body["choices"]]
    if "translations" in body:
        return [t["finish_reason"] for t in body["translations"]]
    return None  # classify and embeddings: prefill only


# (path, body, gen_ai.operation.name, the model that serves it, whether it generates tokens)
CASES = [
    ("/v1/completions", {"model": "base", "prompt": [PROMPT, "A second prompt"], "max_tokens": 4, "n": 2,
                         "temperature": 0.7, "top_p": 0.9}, "text_completion", "base", True),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3},
     "chat", "base", True),
    ("/v1/generate", {"prompt": PROMPT, "max_tokens": 5, "stream": True}, "text_completion", "base", True),
    ("/v1/translate", {"model": "tr", "text": PROMPT, "max_tokens": 4}, "translate", "tr", True),
    ("/v1/classify", {"model": "cls", "text": [PROMPT, "Another"]}, "classify", "cls", False),
    ("/v1/embeddings", {"model": "base", "input": PROMPT}, "embeddings", "base", False),
]


@pytest.mark.parametrize(("path", "body", "operation", "model", "generates"), CASES, ids=[c[0] for c in CASES])
def test_one_span_per_request_says_what_the_answer_said(app, path, body, operation, model, generates):
    client, exporter = app
    resp = client.post(path, json=body)
    assert resp.status_code == 200, resp.text
    got = answer(resp)
    span = only_span(exporter)
    attrs = dict(span.attributes)
    assert span.name == f"{operation} {model}" and span.kind is SpanKind.SERVER
    assert span.status.status_code is StatusCode.UNSET and span.parent is None
    assert attrs["gen_ai.operation.name"] == operation and attrs["http.route"] == path
    assert attrs["http.response.status_code"] == 200
    assert attrs["http.response.header.x-request-id"] == (resp.headers["x-request-id"],)
    assert attrs["gen_ai.response.model"] == model
    assert attrs.get("lmservice.adapter") == (None if model == "base" else model)
    if "id" in got:  # embeddings answer without one
        assert attrs["gen_ai.request.id"] == attrs["gen_ai.response.id"] == got["id"]
    usage = got["usage"]
    assert attrs["gen_ai.usage.prompt_tokens"] == attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"] > 0
    assert (attrs["gen_ai.usage.completion_tokens"] == attrs["gen_ai.usage.output_tokens"]
            == usage.get("completion_tokens", 0))
    if finish_reasons(got) is not None:
        assert sorted(attrs["gen_ai.response.finish_reasons"]) == sorted(finish_reasons(got))

    # Latencies come from the engine's timestamps and add up; the span (the whole HTTP request) holds them.
    lat = {k.removeprefix("gen_ai.latency."): v for k, v in attrs.items() if k.startswith("gen_ai.latency.")}
    assert all(v >= 0 for v in lat.values())
    assert lat["time_in_queue"] + lat["time_in_model_inference"] == pytest.approx(lat["e2e"])
    assert lat["e2e"] <= (span.end_time - span.start_time) / 1e9
    if generates:
        assert lat["time_in_queue"] + lat["time_in_model_prefill"] == pytest.approx(lat["time_to_first_token"])
        assert lat["time_in_model_prefill"] + lat["time_in_model_decode"] == pytest.approx(
            lat["time_in_model_inference"])
        assert attrs["gen_ai.request.max_tokens"] == body["max_tokens"]
    else:  # no token: the prefill is the whole inference, and no sampling parameter was the client's
        assert "time_to_first_token" not in lat and "time_in_model_decode" not in lat
        assert lat["time_in_model_prefill"] == lat["time_in_model_inference"]
        assert not any(k.startswith("gen_ai.request.") and k != "gen_ai.request.id" for k in attrs)

    # No prompt text by default, under any name.
    assert "gen_ai.prompt" not in attrs and "gen_ai.completion" not in attrs
    assert PROMPT not in repr(attrs)


def test_sampling_parameters_are_the_requests(app):
    client, exporter = app
    assert client.post("/v1/completions", json=CASES[0][1]).status_code == 200
    attrs = only_span(exporter).attributes
    assert (attrs["gen_ai.request.temperature"], attrs["gen_ai.request.top_p"], attrs["gen_ai.request.n"],
            attrs["gen_ai.request.max_tokens"]) == (0.7, 0.9, 2, 4)


def test_the_callers_traceparent_is_the_parent(app):
    client, exporter = app
    body = {"prompt": "hi", "max_tokens": 2}
    client.post("/v1/generate", json=body, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    span = only_span(exporter)
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent.span_id == int(PARENT_ID, 16) and span.parent.is_remote
    assert span.context.span_id != int(PARENT_ID, 16)
    # Negative controls: without the header, or with a malformed one, the span starts a trace of its own.
    for headers in ({}, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}"}):
        exporter.clear()
        client.post("/v1/generate", json=body, headers=headers)
        span = only_span(exporter)
        assert span.parent is None and span.context.trace_id != int(TRACE_ID, 16)


def test_other_requests_have_no_span(app):
    client, exporter = app
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert client.post("/tokenize", json={"prompt": "hi"}).status_code == 200
    assert client.get("/v1/completions").status_code == 405
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize(("body", "status"), [
    ({"prompt": "hi", "model": "no-such-model"}, 404),
    ({"prompt": "", "max_tokens": 2}, 400),
    ({"prompt": "hi", "max_tokens": "many"}, 422),
])
def test_a_failed_request_has_an_error_status(app, body, status):
    client, exporter = app
    assert client.post("/v1/generate", json=body).status_code == status
    span = only_span(exporter)
    assert span.status.status_code is StatusCode.ERROR and span.status.description == f"HTTP {status}"
    assert span.attributes["error.type"] == str(status)
    assert span.attributes["http.response.status_code"] == status


def test_an_engine_failure_is_an_error_also_inside_a_200_stream(app, monkeypatch):
    client, exporter = app
    model = client.app.state.server.engine.engine.runner.model
    compute = model.compute_logits
    monkeypatch.setattr(model, "compute_logits", lambda hidden: compute(hidden) * float("nan"))
    body = {"prompt": "hi", "max_tokens": 3}
    assert client.post("/v1/generate", json=body).status_code == 500
    span = only_span(exporter)
    assert span.status.status_code is StatusCode.ERROR and span.attributes["error.type"] == "500"

    exporter.clear()
    resp = client.post("/v1/generate", json={**body, "stream": True})
    assert resp.status_code == 200 and "error" in json.loads(sse_events(resp.content)[0])
    span = only_span(exporter)
    assert span.attributes["http.response.status_code"] == 200
    assert span.status.status_code is StatusCode.ERROR and span.attributes["error.type"] == "500"
    assert "failed inside the engine" in span.status.description


async def _drop_after_the_first_event(app, path: str, body: dict) -> None:
    """A client that reads a stream's first event and then leaves (ASGI 2.3: the app learns it from
    `receive`, as from a server whose socket closed)."""
    content = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": None, "server": None,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]}
    has_event = asyncio.Event()
    requests = iter([{"type": "http.request", "body": content, "more_body": False}])

    async def receive():  # the request whole, then the disconnect once an event has come
        if (message := next(requests, None)) is not None:
            return message
        await has_event.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            has_event.set()

    await app(scope, receive, send)


def test_a_stream_the_client_drops_is_an_error_499(app):
    client, exporter = app
    body = {"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True, "stream": True}
    client.portal.call(_drop_after_the_first_event, client.app, "/v1/generate", body)
    span = only_span(exporter)
    assert span.attributes["http.response.status_code"] == 499 and span.attributes["error.type"] == "499"
    assert span.status.status_code is StatusCode.ERROR and span.status.description == "HTTP 499"
    assert span.attributes["gen_ai.usage.completion_tokens"] < 40  # it did stop early
    # Negative control: the same stream read to its end is a 200 without an error.
    exporter.clear()
    resp = client.post("/v1/generate", json=body)
    assert resp.status_code == 200 and len(sse_events(resp.content)) > 2
    span = only_span(exporter)
    assert span.attributes["http.response.status_code"] == 200 and span.status.status_code is StatusCode.UNSET


def test_logged_prompts_stay_out_of_spans(model_dirs, caplog):
    """--log-prompts fills the request's record with the prompt and output (the record the span is made
    from); only --otlp-trace-prompts may put them into the span."""
    client, exporter = _traced_app(model_dirs, trace_prompts=False, log_prompts=True)
    with client, caplog.at_level(logging.INFO, logger="lmservice.access"):
        for path, body, text_of in [
            ("/v1/generate", {"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True}, lambda a: a["text"]),
            ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": PROMPT}],
                                      "max_tokens": 8, "ignore_eos": True},
             lambda a: a["choices"][0]["message"]["content"]),
        ]:
            exporter.clear()
            resp = client.post(path, json=body)
            assert resp.status_code == 200, resp.text
            output = text_of(resp.json())
            attrs = dict(only_span(exporter).attributes)
            assert "gen_ai.prompt" not in attrs and "gen_ai.completion" not in attrs
            assert PROMPT not in repr(attrs)
            assert output.strip() and not any(output in str(v) for v in attrs.values()), (output, attrs)
    # Positive control: the record held both (the access log shows them), so the span left them out.
    lines = [r for r in caplog.records if r.name == "lmservice.access" and getattr(r, "path", "") == "/v1/generate"]
    assert lines and PROMPT in lines[-1].prompt and lines[-1].output


def test_prompts_and_outputs_only_with_the_flag(model_dirs, caplog):
    client, exporter = _traced_app(model_dirs, trace_prompts=True)
    with client, caplog.at_level(logging.INFO, logger="lmservice.access"):
        resp = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 3})
    attrs = only_span(exporter).attributes
    assert attrs["gen_ai.prompt"] == PROMPT and attrs["gen_ai.completion"] == resp.json()["text"]
    # The flag is the trace's: the access log still keeps prompts and outputs out (--log-prompts is off).
    lines = [r for r in caplog.records if r.name == "lmservice.access" and r.getMessage() == "request"]
    assert lines and all(not hasattr(r, "prompt") and not hasattr(r, "output") for r in lines)
    assert all(getattr(r, "completion_tokens", None) == 3 for r in lines if getattr(r, "path", "") == "/v1/generate")


def test_the_endpoint_must_be_an_http_url():
    with pytest.raises(ValidationError, match="otlp_traces_endpoint 'collector:4318' must be an http"):
        Settings(otlp_traces_endpoint="collector:4318")
    assert Settings(otlp_traces_endpoint="https://collector:4318/v1/traces").otlp_traces_endpoint
