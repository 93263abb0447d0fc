"""OpenTelemetry tracing: one SERVER span per HTTP request to a generating endpoint, exported over OTLP/HTTP.

Imported only when tracing is on (`--otlp-traces-endpoint`; lmservice/api/app.py decides): the SDK is the
`otel` extra. The span is opened at the door, as a child of the caller's `traceparent` (W3C Trace Context, or
what OTEL_PROPAGATORS names), and closed when the response has gone out. Its attributes come from the request's
record (lmservice/api/middleware.py), which the routes and the CallRecorder filled: the served model and adapter,
the sampling parameters, the usage the answer reported, the finish reasons, and latencies computed from the
engine's own timestamps (queue, time to first token, prefill, decode). The names follow the GenAI semantic
conventions as vLLM sets them (`gen_ai.usage.prompt_tokens`, `gen_ai.latency.*`), with the current conventions'
names beside them where the two differ. Prompts and outputs go into a span only with --otlp-trace-prompts.

Everything else is the SDK's and read from the standard OTEL_* variables: the service name and resource
(OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES), the sampler (OTEL_TRACES_SAMPLER: by default a span is sampled
when its parent was, and always when it has none), the exporter's headers, timeout and compression
(OTEL_EXPORTER_OTLP_TRACES_*), the batching (OTEL_BSP_*).
"""

from __future__ import annotations

from opentelemetry import propagate
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmservice.api.middleware import EngineTimes, RequestRecord, record_of

SERVICE = "lmservice"  # service.name, unless the OTEL_* variables name another

# The endpoints that reach the engine, and their gen_ai.operation.name (the GenAI conventions' values where one
# fits; classify and translate have none).
OPERATIONS = {
    "/v1/completions": "text_completion",
    "/v1/chat/completions": "chat",
    "/v1/generate": "text_completion",
    "/v1/classify": "classify",
    "/v1/translate": "translate",
    "/v1/embeddings": "embeddings",
}


class RequestTracing:
    """The tracer behind the middleware, and its provider's lifetime (`shutdown` exports what is left)."""

    def __init__(self, provider: TracerProvider, trace_prompts: bool = False) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("lmservice.api")
        self.trace_prompts = trace_prompts

    @classmethod
    def to_otlp(cls, endpoint: str, trace_prompts: bool) -> RequestTracing:
        """Spans batched and sent to `endpoint` (OTLP over HTTP, protobuf)."""
        # service.name is ours unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES says otherwise (the
        # attributes given to Resource.create would win over both).
        resource = Resource.create({SERVICE_NAME: SERVICE}).merge(OTELResourceDetector().detect())
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        return cls(provider, trace_prompts)

    def shutdown(self) -> None:
        self.provider.shutdown()


class TracingMiddleware:
    """Pure ASGI, outermost: it sees the status and the X-Request-ID every response goes out with (a 413
    answered by the request middleware included), and an exception nothing answered as a 500."""

    def __init__(self, app: ASGIApp, tracing: RequestTracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        operation = OPERATIONS.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if operation is None:
            await self.app(scope, receive, send)
            return
        parent = propagate.extract(Headers(scope=scope))
        span = self.tracing.tracer.start_span(operation, context=parent, kind=SpanKind.SERVER, attributes={
            "gen_ai.operation.name": operation, "http.request.method": "POST", "http.route": scope["path"]})
        record = record_of(scope)
        status = 500

        async def send_traced(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                request_id = Headers(raw=message.get("headers", [])).get("x-request-id")
                if request_id:
                    span.set_attribute("http.response.header.x-request-id", [request_id])
            await send(message)

        try:
            await self.app(scope, receive, send_traced)
        except Exception as e:  # answered by Starlette's outermost handler: a 500
            span.record_exception(e)
            status = 500
            raise
        finally:
            if record.client_disconnected:
                status = 499  # as the request middleware counts and logs it
            _finish(span, operation, record, status, self.tracing.trace_prompts)


def _finish(span: Span, operation: str, record: RequestRecord, status: int, trace_prompts: bool) -> None:
    if record.model:
        span.update_name(f"{operation} {record.model}")
    span.set_attributes(span_attributes(record, status, trace_prompts))
    failed = status if status >= 400 else record.error_status
    if failed is not None:
        span.set_attribute("error.type", str(failed))
        span.set_status(Status(StatusCode.ERROR, record.error or f"HTTP {failed}"))
    span.end()


def span_attributes(record: RequestRecord, status: int, trace_prompts: bool) -> dict:
    """What the span says about the request once it has been answered (see module docstring)."""
    attrs: dict = {"http.response.status_code": status}
    if record.model:
        attrs["gen_ai.response.model"] = record.model
    if record.adapter is not None:
        attrs["lmservice.adapter"] = record.adapter
    if record.response_id is not None:
        attrs["gen_ai.request.id"] = attrs["gen_ai.response.id"] = record.response_id
    if record.params is not None:
        p = record.params
        attrs.update({"gen_ai.request.temperature": p.temperature, "gen_ai.request.top_p": p.top_p,
                      "gen_ai.request.n": p.n})
        if p.max_tokens is not None:
            attrs["gen_ai.request.max_tokens"] = p.max_tokens
    if record.num_engine_requests:
        attrs.update({"gen_ai.usage.prompt_tokens": record.prompt_tokens,
                      "gen_ai.usage.completion_tokens": record.completion_tokens,
                      "gen_ai.usage.input_tokens": record.prompt_tokens,
                      "gen_ai.usage.output_tokens": record.completion_tokens})
    if record.finish_reasons:
        attrs["gen_ai.response.finish_reasons"] = list(record.finish_reasons)
    attrs.update(latencies(record.times))
    if trace_prompts:
        if record.prompt is not None:
            attrs["gen_ai.prompt"] = record.prompt
        if record.output is not None:
            attrs["gen_ai.completion"] = record.output
    return attrs


def latencies(times: EngineTimes) -> dict[str, float]:
    """Seconds between the engine's timestamps (vLLM's gen_ai.latency.* names); a prefill-only request
    (classify, embeddings) has no first token, and its prefill lasts until it finished."""
    t = times
    intervals = {
        "gen_ai.latency.time_in_queue": (t.arrival, t.first_scheduled),
        "gen_ai.latency.time_to_first_token": (t.arrival, t.first_token),
        "gen_ai.latency.time_in_model_prefill": (t.first_scheduled, t.first_token or t.finished),
        "gen_ai.latency.time_in_model_decode": (t.first_token, t.finished),
        "gen_ai.latency.time_in_model_inference": (t.first_scheduled, t.finished),
        "gen_ai.latency.e2e": (t.arrival, t.finished),
    }
    return {name: max(0.0, end - start) for name, (start, end) in intervals.items()
            if start is not None and end is not None}
