"""Request dependencies: the running gateway, the calling tenant, and the admin checks (the key; a JSON body)."""

from __future__ import annotations

import hmac
import re
from typing import Annotated

from fastapi import Depends, Request

from serving.errors import APIError, ErrorCode
from serving.gateway import Gateway
from serving.state.tenants import Tenant


async def get_state(request: Request) -> Gateway:
    state: Gateway = request.app.state.gateway
    return state


StateDep = Annotated[Gateway, Depends(get_state)]


async def get_tenant(request: Request, state: StateDep) -> Tenant:
    # Async on purpose: FastAPI runs sync dependencies in a thread pool, and a thread hop per request costs
    # milliseconds when vLLM keeps every core busy. Keys known (or known to be bogus) are answered from memory;
    # only a key memory cannot answer is looked up in the database, in a worker thread.
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            ErrorCode.INVALID_API_KEY,
            "Missing API key: send it as 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    tenant = await state.tenants.aauthenticate(key.strip())
    if tenant is None:
        raise APIError(ErrorCode.INVALID_API_KEY, "Incorrect API key provided.", headers={"WWW-Authenticate": "Bearer"})
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]


def require_admin(request: Request, state: StateDep) -> None:
    """The admin key, compared in constant time (development mode without one: loopback only, checked at start)."""
    expected = state.settings.admin_key.get_secret_value() if state.settings.admin_key else ""
    if not expected:
        if state.settings.dev_mode:
            return
        raise APIError(ErrorCode.ADMIN_DISABLED, "The admin API is disabled: no admin key is configured.")
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), expected.encode()):
        raise APIError(
            ErrorCode.INVALID_ADMIN_KEY,
            "Admin routes need the admin key: 'Authorization: Bearer <admin key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )


AdminDep = Depends(require_admin)

# The one admin POST whose body is not JSON: an adapter archive (serving.http.routes.admin.publish).
UPLOAD_PATH = r"/admin/adapters/[^/]+/versions"
UPLOAD_RE = re.compile(UPLOAD_PATH)


async def require_json_post(request: Request) -> None:
    """Every admin POST carries a JSON body (``{}`` when there is nothing to say), or an adapter archive.

    A web page can make a browser send a POST with a form or plain-text body to any address, with none of the
    gateway's consent; a JSON body needs a CORS preflight, which the gateway never grants. So a key-rotate or a
    promote can never be triggered by visiting a page, even in development mode with no admin key.
    """
    if request.method != "POST":
        return
    if UPLOAD_RE.fullmatch(request.url.path):
        return  # the upload route takes JSON or an archive type, and refuses every type a form can send
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" or not (await request.body()).strip():
        raise APIError(
            ErrorCode.JSON_BODY_REQUIRED,
            "Admin POSTs take a JSON body with 'Content-Type: application/json' (send {} when there is "
            "nothing to set).",
            status=415 if kind and kind != "application/json" else 400,
        )


JsonPostDep = Depends(require_json_post)
