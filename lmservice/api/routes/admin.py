"""Admin endpoints (admin key only): load and unload LoRA adapters while serving.

Adapters load only from inside settings.adapters_dir (lmservice/serving/adapters.py
refuses any path that escapes it). A removed adapter takes no new requests; requests in
flight on it finish.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from lmservice.api.auth import require_admin_key, server_state
from lmservice.api.errors import APIError, model_not_found
from lmservice.api.schemas.admin import DeletedAdapter, LoadAdapterRequest, LoadedAdapter
from lmservice.api.schemas.common import ERROR_RESPONSES
from lmservice.serving.models import UnknownModelError

router = APIRouter(dependencies=[Depends(require_admin_key)], tags=["admin"])


@router.post("/v1/adapters", status_code=201, response_model=LoadedAdapter, responses=ERROR_RESPONSES)
async def load_adapter(body: LoadAdapterRequest, request: Request) -> LoadedAdapter:
    try:
        entry = await server_state(request).started()[1].add_adapter(body.name, body.path)
    except (ValueError, OSError) as e:  # AdapterPathError, a broken adapter, a missing directory
        raise APIError(400, f"cannot load adapter {body.name!r}: {e}", param="path") from e
    return LoadedAdapter(id=entry.name, parent=entry.parent, tasks=list(entry.tasks))


@router.delete("/v1/adapters/{name}", response_model=DeletedAdapter, responses=ERROR_RESPONSES)
async def unload_adapter(name: str, request: Request) -> DeletedAdapter:
    try:
        await server_state(request).started()[1].remove_adapter(name)
    except UnknownModelError as e:
        raise model_not_found(name, param="name") from e
    return DeletedAdapter(id=name)
