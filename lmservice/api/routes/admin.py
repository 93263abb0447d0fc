"""Admin endpoints (admin key only): load and unload LoRA adapters while serving.

Adapters load only from inside settings.adapters_dir (lmservice/serving/adapters.py refuses any path
that escapes it, or is longer than --max-adapter-path-chars, before touching the file system), and
every file an adapter reads resolves inside it too. The files are read and checked off the event loop
and off the engine thread; any malformed file is a 400 naming the file and field, and a message never
repeats more than a few dozen characters of the request. A removed adapter takes no new requests;
requests in flight on it finish.

lmservice_adapter_load_failures_total counts every adapter whose files failed to load: each POST answered
400 for its files (not for a refused name or path), and, added once as the app starts (this router's
lifespan runs inside the app's, after the models are loaded), the adapters the start-up scan skipped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request

from lmservice.api.auth import require_admin_key, server_state
from lmservice.api.errors import APIError, model_not_found
from lmservice.api.schemas.admin import DeletedAdapter, LoadAdapterRequest, LoadedAdapter
from lmservice.api.schemas.common import ERROR_RESPONSES
from lmservice.serving.adapters import AdapterPathError, shown
from lmservice.serving.models import UnknownModelError


@asynccontextmanager
async def _count_startup_failures(app: FastAPI) -> AsyncIterator[None]:
    state = app.state.server
    if state.models is not None:
        state.metrics.adapter_load_failures.inc(state.models.num_load_failures)
    yield


router = APIRouter(dependencies=[Depends(require_admin_key)], tags=["admin"], lifespan=_count_startup_failures)


@router.post("/v1/adapters", status_code=201, response_model=LoadedAdapter, responses=ERROR_RESPONSES)
async def load_adapter(body: LoadAdapterRequest, request: Request) -> LoadedAdapter:
    state = server_state(request)
    try:
        entry = await state.started()[1].add_adapter(body.name, body.path)
    except AdapterPathError as e:  # a refused name or path: the request's mistake
        raise APIError(400, f"cannot load adapter {shown(body.name)}: {e}", param="path") from e
    except (ValueError, OSError) as e:  # a broken adapter (LoRAAdapterError), a missing or unreadable directory
        state.metrics.adapter_load_failures.inc()
        raise APIError(400, f"cannot load adapter {shown(body.name)}: {e}", param="path") from e
    return LoadedAdapter(id=entry.name, parent=entry.parent, tasks=list(entry.tasks))


@router.delete("/v1/adapters/{name}", response_model=DeletedAdapter, responses=ERROR_RESPONSES)
async def unload_adapter(name: str, request: Request) -> DeletedAdapter:
    state = server_state(request)
    try:
        await state.started()[1].remove_adapter(name)
    except UnknownModelError as e:
        raise model_not_found(name, param="name") from e
    state.metrics.forget_model(name)
    return DeletedAdapter(id=name)
