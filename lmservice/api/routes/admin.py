"""Admin endpoints (admin key only): load and unload LoRA adapters while serving.

Adapters load only from inside settings.adapters_dir (lmservice/serving/adapters.py
refuses any path that escapes it). A removed adapter takes no new requests; requests in
flight on it finish.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field

from lmservice.api.auth import require_admin_key, server_state
from lmservice.api.errors import APIError, model_not_found
from lmservice.api.schemas.common import ERROR_RESPONSES, RequestBody
from lmservice.serving.models import UnknownModelError

router = APIRouter(dependencies=[Depends(require_admin_key)], tags=["admin"])


class LoadAdapterRequest(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "sst2", "path": "sst2"}]})

    name: str = Field(..., description="Name the adapter is served under (the `model` of requests).")
    path: str = Field(..., description="Adapter directory, relative to the server's --adapters-dir.")


@router.post("/v1/adapters", status_code=201, responses={201: {"content": {"application/json": {"example": {
    "id": "sst2", "object": "model", "parent": "base", "tasks": ["classify"]}}}}, **ERROR_RESPONSES})
async def load_adapter(body: LoadAdapterRequest, request: Request):
    try:
        entry = await server_state(request).started()[1].add_adapter(body.name, body.path)
    except (ValueError, OSError) as e:  # AdapterPathError, a broken adapter, a missing directory
        raise APIError(400, f"cannot load adapter {body.name!r}: {e}", param="path") from e
    return JSONResponse({"id": entry.name, "object": "model", "parent": entry.parent, "tasks": list(entry.tasks)},
                        status_code=201)


@router.delete("/v1/adapters/{name}", responses={200: {"content": {"application/json": {"example": {
    "id": "sst2", "object": "model", "deleted": True}}}}, **ERROR_RESPONSES})
async def unload_adapter(name: str, request: Request):
    try:
        await server_state(request).started()[1].remove_adapter(name)
    except UnknownModelError as e:
        raise model_not_found(name, param="name") from e
    return {"id": name, "object": "model", "deleted": True}
