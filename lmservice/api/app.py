"""The FastAPI application: routes, error handlers, middleware and the engine's lifetime."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from lmservice.api.errors import install_handlers
from lmservice.api.middleware import RequestContextMiddleware
from lmservice.api.playground import docs_router
from lmservice.api.playground import router as playground_router
from lmservice.api.routes import admin, embeddings, openai, probes, tasks, tokenize
from lmservice.api.state import ServerState
from lmservice.config import Settings
from lmservice.metrics import Metrics

if TYPE_CHECKING:
    from lmservice.api.tracing import RequestTracing
    from lmservice.serving.bootstrap import Serving

logger = logging.getLogger(__name__)

INSTALL_OTEL_EXTRA = "pip install 'lmservice[otel]' (from a checkout: pip install -e '.[otel]')"


class TracingUnavailableError(RuntimeError):
    """Tracing was asked for (--otlp-traces-endpoint) and the otel extra is not installed."""


def open_tracing(settings: Settings) -> RequestTracing | None:
    """The OTLP tracing `settings` ask for, or None when off; OpenTelemetry's SDK is imported only here, only
    then. Raises TracingUnavailableError, naming the install command, without the otel extra."""
    if settings.otlp_traces_endpoint is None:
        return None
    try:
        from lmservice.api.tracing import RequestTracing
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("opentelemetry"):
            raise
        raise TracingUnavailableError(f"--otlp-traces-endpoint needs the otel extra (missing: {e.name}); "
                                      f"install it with: {INSTALL_OTEL_EXTRA}") from e
    logger.info("tracing", extra={"otlp_traces_endpoint": settings.otlp_traces_endpoint,
                                  "otlp_trace_prompts": settings.otlp_trace_prompts})
    return RequestTracing.to_otlp(settings.otlp_traces_endpoint, settings.otlp_trace_prompts)


def create_app(settings: Settings, serving: Serving | None = None, metrics: Metrics | None = None,
               tracing: RequestTracing | None = None) -> FastAPI:
    """The app for one server. Without `serving` (the engine and its models), it is built from
    `settings` at startup; without `tracing`, from settings.otlp_traces_endpoint (none when unset). The
    app shuts its tracing down (exporting the spans still batched) when it stops.

    The engine's worker thread starts when the app starts (inside the running loop)
    and stops when it shuts down; the app never blocks its loop on model compute.
    """
    state = ServerState(settings=settings, metrics=metrics or Metrics())
    tracing = tracing or open_tracing(settings)
    if serving is not None:
        state.serve(serving)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.engine is None:
            from lmservice.serving.bootstrap import build_serving  # here: torch and the model are heavy

            state.serve(build_serving(settings))
        engine, models = state.started()
        engine.start()
        logger.info("engine started", extra={"models": [m.name for m in models.models()]})
        try:
            yield
        finally:
            await state.engine.shutdown()
            state.tokenizing.shutdown()
            logger.info("engine stopped")
            if tracing is not None:
                await asyncio.to_thread(tracing.shutdown)

    app = FastAPI(
        title="lmservice",
        summary="GPT-2-family inference: native generate/classify/translate and an OpenAI-compatible API.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI from the package instead of a CDN: docs_router
        redoc_url=None,
        # No 307 to the path with(out) a trailing slash: Starlette builds its Location from the client's Host
        # header; an unknown path is a 404 like any other.
        redirect_slashes=False,
    )
    app.state.server = state
    install_handlers(app)
    for module in (probes, tasks, openai, embeddings, tokenize, admin):
        app.include_router(module.router)
    app.include_router(docs_router)
    if settings.playground:
        app.include_router(playground_router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-ID", "Retry-After"])
    # Added last = outermost: every response (413s and 500s included) carries the request id and is logged.
    app.add_middleware(RequestContextMiddleware, state=state)
    if tracing is not None:
        from lmservice.api.tracing import TracingMiddleware

        app.add_middleware(TracingMiddleware, tracing=tracing)  # outermost: every answer's status and request id
    return app
