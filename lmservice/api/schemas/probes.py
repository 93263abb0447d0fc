"""Bodies of /health and /ready."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Kernels(BaseModel):
    ops: str = Field(description="The op set: torch, native (torch ops + C decode attention) or triton.")
    cpu: str = Field(description="The build of the C kernels this CPU runs (x86-64-v4-vnni, ...), or torch.")


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"status": "ok", "kernels": {"ops": "native", "cpu": "x86-64-v3"}}]})

    status: Literal["ok"] = "ok"
    kernels: Kernels | None = Field(None, description="The kernels in use (null before the engine is built).")


class Readiness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ready"}]})

    status: Literal["ready"] = "ready"
