"""The web playground: a static page at `/` and its assets at `/playground/<file>`; and the interactive API
docs (Swagger UI) at `/docs`, whose assets come from an installed package too (`/docs/<file>`).

The page is a client of the public API like any other (it calls /v1/... and /metrics with the key
the user types), so serving it needs no key and reveals nothing: the files are the same for every
server. The files are shipped inside the package (no build step, no CDN) and read once at import;
only names in that fixed set are served, so no request path ever reaches the file system.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from lmservice.api.errors import APIError

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Swagger UI's bundle and style, as the swagger-ui-py package ships them (Swagger UI 5, which reads OpenAPI
# 3.1; Apache-2.0): found without importing the package, whose code /docs does not need.
SWAGGER_UI_DIR = Path(importlib.util.find_spec("swagger_ui").submodule_search_locations[0]) / "static"
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# NOTE: no inline script or style anywhere in the pages, so the policy can forbid both; a page may talk
# to this origin only (connect-src 'self'), which is also what keeps it working offline. Every response of
# the app carries these (lmservice/api/middleware.py), the pages' and the API's alike.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_HEADERS = {"Cache-Control": "no-cache"}  # revalidate: a server upgrade must not leave an old page talking to it
# What /docs serves: Swagger UI's bundle and style, and our start-up script and icon.
_DOCS_ASSETS = {"docs.js", "swagger-ui-bundle.js", "swagger-ui.css", "favicon.svg"}
_ASSETS = {p.name: (p.read_bytes(), _MEDIA_TYPES[p.suffix])
           for p in [*sorted(STATIC_DIR.iterdir()), SWAGGER_UI_DIR / "swagger-ui-bundle.js",
                     SWAGGER_UI_DIR / "swagger-ui.css"] if p.suffix in _MEDIA_TYPES}

router = APIRouter(include_in_schema=False)
docs_router = APIRouter(include_in_schema=False)


def _asset(name: str) -> Response:
    if name not in _ASSETS:
        raise APIError(404, f"no playground file {name!r}")
    body, media_type = _ASSETS[name]
    return Response(body, media_type=media_type, headers=_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
async def page() -> Response:
    return _asset("index.html")


@router.get("/playground/{name}")
async def asset(name: str) -> Response:
    return _asset(name)


@docs_router.get("/docs")
async def docs_page() -> Response:
    return _asset("docs.html")


@docs_router.get("/docs/{name}")
async def docs_asset(name: str) -> Response:
    if name not in _DOCS_ASSETS:
        raise APIError(404, f"no docs file {name!r}")
    return _asset(name)
