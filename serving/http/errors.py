"""The error handlers: every error, whoever raised it, leaves in the one shape of ``serving.errors``.

Routes and everything below them raise ``APIError`` (or let FastAPI's own
errors through); the handlers registered here turn every one of them into
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with its status, a
state database that does not answer into ``state_unavailable``, and an
unexpected exception into a 500 of the same shape (``internal_error``).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import APIError, ErrorCode, error_body
from serving.http.observe import record_of
from serving.http.protocol import unsupported_message
from serving.metrics import rejection_reason
from serving.state.db import UNREACHABLE

log = logging.getLogger("lorafleet.gateway")

# Errors FastAPI and Starlette raise themselves (no route; a route without this method), by status.
_ROUTING = {404: ErrorCode.UNKNOWN_ROUTE, 405: ErrorCode.METHOD_NOT_ALLOWED}


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _refuse(request, exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _refuse(request, exc.status_code, str(exc.detail), _ROUTING.get(exc.status_code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        unknown = next((e for e in errors if e.get("type") == "extra_forbidden"), None)
        # A field outside the allowlist (serving.http.protocol): named, with what to use instead.
        if unknown is not None and request.url.path.startswith("/v1/"):
            field = ".".join(str(p) for p in unknown.get("loc", ()) if p != "body")
            return _refuse(request, 400, unsupported_message(field), ErrorCode.UNSUPPORTED_PARAMETER, field)
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":  # not JSON at all: a bad request, not a bad field
            reason = (first.get("ctx") or {}).get("error", "cannot parse")
            return _refuse(request, 400, f"The body is not valid JSON: {reason}.", ErrorCode.INVALID_JSON)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid body"))
        return _refuse(request, 422, message, ErrorCode.INVALID_FIELD, param)

    async def _state_unreachable(request: Request, exc: Exception) -> JSONResponse:
        # The state database is down or restarting: nothing was written; the client may retry. Requests whose
        # key and policy are cached keep being served meanwhile.
        log.warning("state database unreachable on %s %s: %s", request.method, request.url.path, exc)
        return _refuse(
            request,
            503,
            "The state database is unreachable right now; nothing was changed. Retry shortly.",
            ErrorCode.STATE_UNAVAILABLE,
            headers={"Retry-After": "2"},
        )

    for unreachable in UNREACHABLE:
        app.add_exception_handler(unreachable, _state_unreachable)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: the same shape, no internals in the message (they go to the log).
        log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _refuse(
            request,
            500,
            "The gateway failed on this request; it is logged. Retry, or report it with the x-request-id header.",
            ErrorCode.INTERNAL_ERROR,
        )


def _refuse(
    request: Request,
    status: int,
    message: str,
    code: ErrorCode | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error response; the request's record notes the refusal for the metrics and the access log."""
    record = record_of(request.scope)
    if record is not None:
        record.rejection, record.error_code = rejection_reason(status, code), code.value if code else None
    return JSONResponse(error_body(status, message, code, param), status, headers=headers)
