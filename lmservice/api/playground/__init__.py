"""The web playground: a static page at `/` and its assets at `/playground/<file>`.

The page is a client of the public API like any other (it calls /v1/... and /metrics with the key
the user types), so serving it needs no key and reveals nothing: the files are the same for every
server. The files are shipped inside the package (no build step, no CDN) and read once at import;
only names in that fixed set are served, so no request path ever reaches the file system.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from lmservice.api.errors import APIError

STATIC_DIR = Path(__file__).resolve().parent / "static"
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# NOTE: no inline script or style anywhere in the page, so the policy can forbid both; the page may talk
# to this origin only (connect-src 'self'), which is also what keeps it working offline.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a server upgrade must not leave an old page talking to it
}
_ASSETS = {p.name: (p.read_bytes(), _MEDIA_TYPES[p.suffix])
           for p in sorted(STATIC_DIR.iterdir()) if p.suffix in _MEDIA_TYPES}

router = APIRouter(include_in_schema=False)


def _asset(name: str) -> Response:
    if name not in _ASSETS:
        raise APIError(404, f"no playground file {name!r}")
    body, media_type = _ASSETS[name]
    return Response(body, media_type=media_type, headers=_HEADERS)


@router.get("/")
async def page() -> Response:
    return _asset("index.html")


@router.get("/playground/{name}")
async def asset(name: str) -> Response:
    return _asset(name)
