"""One error shape on the wire: OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

Routes raise ``APIError`` (or let FastAPI's own errors through); the handlers
registered here turn every one of them into that shape with the right status,
and an unexpected exception into a 500 of the same shape (``internal_error``).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.metrics import rejection_reason
from serving.observe import record_of
from serving.protocol import unsupported_message

log = logging.getLogger("lorafleet.gateway")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _refuse(request, exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _refuse(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        unknown = next((e for e in errors if e.get("type") == "extra_forbidden"), None)
        # A field outside the allowlist (serving.protocol): named, with what to use instead.
        if unknown is not None and request.url.path.startswith("/v1/"):
            field = ".".join(str(p) for p in unknown.get("loc", ()) if p != "body")
            return _refuse(request, 400, unsupported_message(field), "unsupported_parameter", field)
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":  # not JSON at all: a bad request, not a bad field
            reason = (first.get("ctx") or {}).get("error", "cannot parse")
            return _refuse(request, 400, f"The body is not valid JSON: {reason}.", "invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid body"))
        return _refuse(request, 422, message, "invalid_field", param)

    @app.exception_handler(sa_exc.OperationalError)
    @app.exception_handler(sa_exc.InterfaceError)
    async def _state_unreachable(request: Request, exc: Exception) -> JSONResponse:
        # The state database is down or restarting: nothing was written; the client may retry. Requests whose
        # key and policy are cached keep being served meanwhile.
        log.warning("state database unreachable on %s %s: %s", request.method, request.url.path, exc)
        return _refuse(request, 503, "The state database is unreachable right now; nothing was changed. Retry "
                       "shortly.", "state_unavailable", headers={"Retry-After": "2"})  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: the same shape, no internals in the message (they go to the log).
        log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _refuse(request, 500, "The gateway failed on this request; it is logged. Retry, or report it with "
                       "the x-request-id header.", "internal_error")  # fmt: skip


def _refuse(
    request: Request,
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error response; the request's record notes the refusal for the metrics and the access log."""
    record = record_of(request.scope)
    if record is not None:
        record.rejection, record.error_code = rejection_reason(status, code), code
    return JSONResponse(error_body(status, message, code, param), status, headers=headers)
