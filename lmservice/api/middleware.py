"""Per-request context: the request id, the security headers, the body size limit, one structured log line and
the requests counter.

A pure ASGI middleware (not BaseHTTPMiddleware) so streamed responses pass
through untouched and client disconnects reach the routes.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmservice.api.errors import error_body
from lmservice.api.jsonlog import request_id_var
from lmservice.api.playground import SECURITY_HEADERS
from lmservice.api.state import ServerState

if TYPE_CHECKING:
    from lmservice.engine.sampling_params import SamplingParams

access_log = logging.getLogger("lmservice.access")

# A client's X-Request-ID is echoed only when it is short and printable; otherwise we make one.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_SECURITY_HEADERS = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]
# Routes we name in the metric; anything else counts as "other" so a scanner cannot blow up label cardinality.
_OTHER = "other"


@dataclass
class EngineTimes:
    """When the engine handled one HTTP request's engine requests (time.monotonic()): the earliest arrival, first
    scheduling and first token among them, and when the last one's final output was collected."""

    arrival: float | None = None
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass
class RequestRecord:
    """What the routes tell the log line, the metrics and the trace about one HTTP request."""

    model: str = ""
    response_id: str | None = None  # the id the answer carries (cmpl-…, gen-…)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    num_engine_requests: int = 0
    ttft_ms: float | None = None
    queue_ms: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    prompt: str | None = None  # only with settings.log_prompts or otlp_trace_prompts (each sink checks its own)
    output: str | None = None  # likewise
    client_disconnected: bool = False  # a stream the client dropped before its end (status 499)
    error: str | None = None  # a failure reported inside a stream whose 200 had gone out
    error_status: int | None = None  # ... and the status it would have had
    # For the trace only (lmservice/api/tracing.py), never in the log line:
    adapter: str | None = None  # the adapter that served, None for the base model
    params: SamplingParams | None = None
    times: EngineTimes = field(default_factory=EngineTimes)

    def log_fields(self, with_prompts: bool) -> dict[str, object]:
        """The access log line's fields: those set, prompt and output only `with_prompts`."""
        skip = {"client_disconnected", "adapter", "params", "times"}
        if not with_prompts:
            skip |= {"prompt", "output"}
        return {f.name: value for f in fields(self)
                if f.name not in skip and (value := getattr(self, f.name)) not in (None, [], "")}


def record_of(scope: Scope) -> RequestRecord:
    """The record of the request in `scope` (Starlette's request.state is backed by scope["state"])."""
    state = scope.setdefault("state", {})
    if "record" not in state:
        state["record"] = RequestRecord()
    return state["record"]


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get("x-request-id", "")
        request_id = incoming if _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        record = record_of(scope)
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode()),
                                      *_SECURITY_HEADERS]
            await send(message)

        limit = self.state.settings.max_body_bytes
        received = 0

        async def receive_with_limit() -> Message:
            # Bodies sent without Content-Length (chunked) are counted as they arrive.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413)  # rendered in the one error shape by errors.install_handlers
            return message

        try:
            declared = Headers(scope=scope).get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                response = JSONResponse(error_body(413, f"request body too large (limit {limit} bytes)"), 413)
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive_with_limit, send_with_id)
        finally:
            if record.client_disconnected:
                status = 499  # nginx's "client closed request": the 200 header went out, the answer did not
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or _OTHER
            self.state.metrics.requests.labels(endpoint, record.model, str(status)).inc()
            access_log.info("request", extra={
                "method": scope["method"], "path": scope["path"], "status": status,
                "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                **record.log_fields(with_prompts=self.state.settings.log_prompts)})
            request_id_var.reset(token)
