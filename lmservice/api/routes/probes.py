"""Operator endpoints: /health (liveness), /ready (readiness), /metrics (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmservice.api.auth import require_probe_access, server_state
from lmservice.api.errors import APIError, error_response
from lmservice.api.schemas.common import ErrorResponse
from lmservice.api.schemas.probes import Health, Readiness

router = APIRouter(dependencies=[Depends(require_probe_access)], tags=["probes"])

_UNAVAILABLE = {503: {"model": ErrorResponse, "description": "Not ready / engine dead"}}


@router.get("/health", response_model=Health, responses=_UNAVAILABLE)
async def health(request: Request) -> Health | Response:
    """Liveness: the process answers. 503 only when the engine thread died (a restart is the cure)."""
    state = server_state(request)
    if state.engine is not None and not state.engine.is_alive() and not state.is_draining:
        return error_response(APIError(503, "engine loop is not running"))
    return Health(kernels=state.engine.kernels if state.engine is not None else None)


@router.get("/ready", response_model=Readiness, responses=_UNAVAILABLE)
async def ready(request: Request) -> Readiness | Response:
    """Readiness: model loaded, engine loop alive, not draining."""
    state = server_state(request)
    if state.is_ready():
        return Readiness()
    reason = "draining" if state.is_draining else "engine not running"
    return error_response(APIError(503, f"not ready: {reason}"))


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": "lmservice_num_requests_running 3.0\n"}}}})
async def metrics(request: Request):
    state = server_state(request)
    state.refresh_engine_metrics()
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
