"""The admin API: tenants, their keys, grants and limits. Separate credential (``LORAFLEET_ADMIN_KEY``).

Every route mirrors a ``lorafleet tenants`` command; both go through
``serving.tenants.TenantStore``. A new or rotated key is in the response once
and never again.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from serving.deps import StateDep
from serving.errors import APIError
from serving.tenants import Limits, TenantError, TenantNotFound

TENANT_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


def require_admin(request: Request, state: StateDep) -> None:
    expected = state.settings.admin_key.get_secret_value() if state.settings.admin_key else ""
    if not expected:
        if state.settings.dev_mode:
            return  # development mode without an admin key: loopback only (checked at start)
        raise APIError(403, "The admin API is disabled: no admin key is configured.", code="admin_disabled")
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), expected.encode()):
        raise APIError(401, "Admin routes need the admin key: 'Authorization: Bearer <admin key>'.",
                       code="invalid_admin_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class LimitsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)
    max_concurrent: int | None = Field(default=None, ge=1, le=100_000)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=TENANT_NAME)
    aliases: list[str] = Field(default_factory=list, max_length=1000)
    limits: LimitsBody = Field(default_factory=LimitsBody)


class TenantPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    disabled: bool | None = None
    default_alias: str | None = None
    limits: LimitsBody | None = None


def _refused(exc: TenantError) -> APIError:
    if isinstance(exc, TenantNotFound):
        return APIError(404, str(exc), code="tenant_not_found")
    return APIError(400, str(exc), code="tenant_refused")


@router.get("/tenants")
def list_tenants(state: StateDep) -> dict[str, Any]:
    return {"object": "list", "data": [t.as_dict() for t in state.tenants.all()]}


@router.post("/tenants", status_code=201)
def create_tenant(body: TenantCreate, state: StateDep) -> dict[str, Any]:
    """Create a tenant with its grants and limits; the response holds its first API key (shown once)."""
    try:
        tenant = state.tenants.create(body.name)
        for alias in body.aliases:
            state.tenants.grant(tenant, alias)
        tenant = state.tenants.set_limits(body.name, Limits(**body.limits.model_dump()))
        key = state.tenants.issue_key(tenant)
    except TenantError as exc:
        raise _refused(exc) from exc
    return tenant.as_dict() | {"api_key": key}


@router.get("/tenants/{name}")
def get_tenant(name: str, state: StateDep) -> dict[str, Any]:
    try:
        tenant = state.tenants.require(name)
    except TenantError as exc:
        raise _refused(exc) from exc
    keys = [
        {"key_id": k.key_id, "created_at": k.created_at.isoformat(),
         "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None}
        for k in state.tenants.keys(tenant)
    ]  # fmt: skip
    return tenant.as_dict() | {"keys": keys}


@router.patch("/tenants/{name}")
def patch_tenant(name: str, body: TenantPatch, state: StateDep) -> dict[str, Any]:
    """Disable or enable, set the default alias, or replace the limits."""
    try:
        tenant = state.tenants.require(name)
        if body.disabled is not None:
            tenant = state.tenants.set_disabled(name, body.disabled)
        if "default_alias" in body.model_fields_set:
            tenant = state.tenants.set_default_alias(name, body.default_alias)
        if body.limits is not None:
            tenant = state.tenants.set_limits(name, Limits(**body.limits.model_dump()))
    except TenantError as exc:
        raise _refused(exc) from exc
    return tenant.as_dict()


@router.post("/tenants/{name}/keys", status_code=201)
def issue_key(name: str, state: StateDep, rotate: bool = False) -> dict[str, str]:
    """A new key (shown once); ``?rotate=true`` also revokes every other live key of the tenant."""
    try:
        tenant = state.tenants.require(name)
    except TenantError as exc:
        raise _refused(exc) from exc
    key = state.tenants.rotate_key(tenant) if rotate else state.tenants.issue_key(tenant)
    return {"api_key": key, "key_id": key[:11]}


@router.delete("/tenants/{name}/keys/{key_id}", status_code=204)
def revoke_key(name: str, key_id: str, state: StateDep) -> Response:
    try:
        state.tenants.revoke_key(state.tenants.require(name), key_id)
    except TenantError as exc:
        raise _refused(exc) from exc
    return Response(status_code=204)


@router.put("/tenants/{name}/grants/{alias}")
def grant(name: str, alias: Annotated[str, Field(pattern=TENANT_NAME)], state: StateDep) -> dict[str, Any]:
    try:
        tenant = state.tenants.require(name)
    except TenantError as exc:
        raise _refused(exc) from exc
    state.tenants.grant(tenant, alias)
    return state.tenants.require(name).as_dict()


@router.delete("/tenants/{name}/grants/{alias}")
def revoke_grant(name: str, alias: str, state: StateDep) -> dict[str, Any]:
    try:
        tenant = state.tenants.require(name)
    except TenantError as exc:
        raise _refused(exc) from exc
    state.tenants.revoke_grant(tenant, alias)
    return state.tenants.require(name).as_dict()
