"""One error shape for every failure the API reports: OpenAI's

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

The official `openai` client picks its exception class from the status code
alone (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
422 UnprocessableEntityError, 429 RateLimitError, 5xx InternalServerError), so
the status codes below are the contract; `type` and `code` are for humans.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmservice.engine.outputs import EngineRequestError, QueueFullError, RequestRejectedError
from lmservice.serving.models import UnknownModelError

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    408: "invalid_request_error",
    414: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    499: "client_closed_request",
    500: "internal_error",
    501: "not_implemented_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A failure with its HTTP status; raised anywhere in a route, rendered by `install_handlers`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; its engine requests are already aborted."""


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), status_code=err.status,
                        headers=err.headers)


def model_not_found(name: str, param: str = "model") -> APIError:
    return APIError(404, f"model {name!r} does not exist", param=param, code="model_not_found")


def from_engine_error(exc: Exception) -> APIError:
    """Map what the layers below raise for a request to HTTP: UnknownModelError (404), QueueFullError (429),
    EngineRequestError (500), RequestRejectedError and any ValueError carrying `.param` (400)."""
    if isinstance(exc, UnknownModelError):
        return model_not_found(exc.name)
    if isinstance(exc, QueueFullError):
        # Retry-After is whole seconds (RFC 9110); never 0, which would invite a hot retry loop.
        retry_after = max(1, math.ceil(exc.retry_after_s))
        return APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(retry_after)})
    if isinstance(exc, EngineRequestError):
        cause = str(exc).strip().split("\n", 1)[0][:300]  # never a multi-line dump of some library's state
        return APIError(500, f"the request failed inside the engine: {cause}", code="engine_error")
    if isinstance(exc, ValueError):  # RequestRejectedError and SamplingParams.validate() both carry .param
        return APIError(400, str(exc), param=getattr(exc, "param", None))
    raise TypeError(f"not an engine error: {exc!r}")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('msg', 'invalid JSON')}", None
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if param is None and loc:
            param = loc[0]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body", param


def _unreadable_body(exc: StarletteHTTPException) -> str | None:
    """Why FastAPI could not parse a JSON body, when that is what its 400 means; None otherwise.

    NOTE: FastAPI answers JSON it cannot decode (json.JSONDecodeError) with 422 but any other failure to
    parse a body (bytes that are not UTF-8, nesting past the parser's recursion limit) with a bare 400,
    raised `from` the cause. Both are a malformed body: one status (422) and one message for all of them."""
    cause = exc.__cause__
    if exc.status_code != 400:
        return None
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 (byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, ValueError):
        return "not JSON"
    return None


def install_handlers(app: FastAPI) -> None:
    """Every error path of the app answers in the one shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        unreadable = _unreadable_body(exc)
        if unreadable is not None:
            return error_response(APIError(422, f"malformed JSON body: {unreadable}"))
        if exc.status_code == 413:
            message = f"request body too large (limit {request.app.state.server.settings.max_body_bytes} bytes)"
        return error_response(APIError(exc.status_code, message, headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(422, message, param=param))

    @app.exception_handler(UnknownModelError)
    @app.exception_handler(QueueFullError)
    @app.exception_handler(RequestRejectedError)
    @app.exception_handler(EngineRequestError)
    async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(from_engine_error(exc))

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(request: Request, exc: ClientDisconnected) -> JSONResponse:
        # Nobody reads this; 499 (nginx's "client closed request") makes the log line and the metric honest.
        return error_response(APIError(499, "client disconnected"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(APIError(500, "internal server error"))
