"""API keys: `Authorization: Bearer <key>`, compared in constant time.

No keys configured means no authentication. Probes (/health, /ready, /metrics)
are open unless `settings.auth_probes`; the admin endpoints take the admin key only.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from lmservice.api.errors import APIError
from lmservice.api.state import ServerState


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches_any(token: str, keys: list[str]) -> bool:
    # Compare against every key, with no early exit, so timing does not tell which prefix or key matched.
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def _check(token: str | None, keys: list[str]) -> None:
    if token is None:
        raise APIError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
    if not _matches_any(token, keys):
        raise APIError(401, "invalid API key", code="invalid_api_key")


def server_state(request: Request) -> ServerState:
    return request.app.state.server


async def require_api_key(request: Request) -> None:
    """Dependency of every model endpoint."""
    keys = server_state(request).settings.api_key
    if keys:
        _check(_bearer(request), keys)


async def require_probe_access(request: Request) -> None:
    """Dependency of /health, /ready and /metrics: open unless settings.auth_probes."""
    settings = server_state(request).settings
    if settings.auth_probes and settings.api_key:
        _check(_bearer(request), settings.api_key)


async def require_admin_key(request: Request) -> None:
    """Dependency of the admin endpoints; they do not exist unless an admin key is configured."""
    admin_key = server_state(request).settings.admin_key
    if not admin_key:
        raise APIError(404, "admin endpoints are disabled (no admin key configured)")
    _check(_bearer(request), [admin_key])
