"""Request dependencies: the running gateway, the calling tenant, and the admin check."""

from __future__ import annotations

import hmac
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
