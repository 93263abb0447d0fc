"""Bodies of the admin endpoints: load and unload LoRA adapters while serving."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lmservice.api.schemas.common import RequestBody


class LoadAdapterRequest(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "sst2", "path": "sst2"}]})

    name: str = Field(..., description="Name the adapter is served under (the `model` of requests).")
    path: str = Field(..., description="Adapter directory, relative to the server's --adapters-dir.")


class LoadedAdapter(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"id": "sst2", "object": "model", "parent": "base", "tasks": ["classify"]}]})

    id: str
    object: Literal["model"] = "model"
    parent: str | None
    tasks: list[str]


class DeletedAdapter(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"id": "sst2", "object": "model", "deleted": True}]})

    id: str
    object: Literal["model"] = "model"
    deleted: bool = True
