"""Admin endpoints (admin key only): load and unload LoRA adapters at runtime.

Not implemented by the engine yet: both answer 501 behind the admin key.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict

from service.api.auth import require_admin_key
from service.api.errors import APIError
from service.api.schemas.common import ERROR_RESPONSES, ErrorResponse

router = APIRouter(dependencies=[Depends(require_admin_key)], tags=["admin"])

_NOT_IMPLEMENTED = {501: {"model": ErrorResponse, "description": "Runtime adapter loading is not supported yet"}}


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "sst2", "path": "sst2"}]})

    name: str
    path: str  # relative to settings.adapters_dir, the only place adapters may be loaded from


@router.post("/v1/adapters", responses={**ERROR_RESPONSES, **_NOT_IMPLEMENTED})
async def load_adapter(body: LoadAdapterRequest):
    raise APIError(501, "loading adapters at runtime is not supported yet")


@router.delete("/v1/adapters/{name}", responses={**ERROR_RESPONSES, **_NOT_IMPLEMENTED})
async def unload_adapter(name: str):
    raise APIError(501, "unloading adapters at runtime is not supported yet")
