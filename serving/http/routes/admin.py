"""The admin API: tenants, keys, grants, limits and the adapter registry. Its own credential (``LORAFLEET_ADMIN_KEY``).

Tenant routes mirror the ``lorafleet tenants`` commands (both go through
``serving.state.tenants.TenantStore``); a new or rotated key is in the response once
and never again. Adapter routes publish a version (from a directory under the
import root, or an uploaded tar/zip archive), promote or roll back the stable
pointer (a passing evaluation gate required unless forced, recorded), and
retire versions (unloaded from the engine once their last request finishes).
Every publish is checked by ``contract.fit`` first; a refused one leaves nothing. An adapter
for a base model no engine serves is stored, with a warning in the answer and in ``/readyz``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from contract.manifest import ManifestError
from contract.store import (
    STAGING,
    AdapterStore,
    StoreConflict,
    StoreError,
    VersionNotFound,
    check_alias,
    staging_name,
)
from serving.config import import_root_of
from serving.errors import APIError, ErrorCode
from serving.gateway import Gateway
from serving.http.archive import ArchiveError, discard, unpack
from serving.http.deps import AdminDep, JsonPostDep, StateDep
from serving.outputs.modes import AliasPolicy, JsonMode
from serving.outputs.schemas import check_client_schema_bounded
from serving.state.policies import RolloutPolicy
from serving.state.tenants import DEFAULT_LIMITS, Limits, TenantError, TenantNotFound, key_id_of

log = logging.getLogger("lorafleet.admin")

ARCHIVE_TYPES = {
    "application/x-tar",
    "application/gzip",
    "application/x-gzip",
    "application/zip",
    "application/octet-stream",
}

UPLOAD_WRITE_BYTES = 1 << 20
TENANT_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


router = APIRouter(prefix="/admin", dependencies=[AdminDep, JsonPostDep])


class LimitsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)
    max_concurrent: int | None = Field(default=None, ge=1, le=100_000)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    tokens_per_minute: int | None = Field(default=None, ge=1, le=1_000_000_000)
    running_jobs: int | None = Field(default=None, ge=1, le=10_000)
    queued_jobs: int | None = Field(default=None, ge=1, le=100_000)


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
        return APIError(ErrorCode.TENANT_NOT_FOUND, str(exc))
    return APIError(ErrorCode.TENANT_REFUSED, str(exc))


@router.get("/tenants")
def list_tenants(state: StateDep) -> dict[str, Any]:
    return {"object": "list", "data": [t.as_dict() for t in state.tenants.all()]}


@router.post("/tenants", status_code=201)
def create_tenant(body: TenantCreate, state: StateDep) -> dict[str, Any]:
    """Create a tenant with its grants and limits; the response holds its first API key (shown once)."""
    # A limit left out gets the default (max_tokens: DEFAULT_LIMITS); one given as null is no limit.
    limits = vars(DEFAULT_LIMITS) | body.limits.model_dump(include=body.limits.model_fields_set)
    try:
        tenant, key = state.tenants.enroll(body.name, body.aliases, Limits(**limits))
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
        {
            "key_id": k.key_id,
            "created_at": k.created_at.isoformat(),
            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
        }
        for k in state.tenants.keys(tenant)
    ]
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
    return {"api_key": key, "key_id": key_id_of(key)}


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


# -- adapters ------------------------------------------------------------------------------------


class PublishFromPath(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096)


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    force: bool = False
    reason: str = Field(default="", max_length=2000)
    expected_stable: int | None = Field(
        default=None,
        description="The stable version you saw (null: none); 409 if another writer moved it since. "
        "Unset: the one this gateway sees when the request arrives.",
    )


def _store_refused(exc: StoreError) -> APIError:
    if isinstance(exc, VersionNotFound):
        return APIError(ErrorCode.ADAPTER_NOT_FOUND, str(exc))
    if isinstance(exc, StoreConflict):
        return APIError(ErrorCode.ALIAS_CHANGED, str(exc))
    return APIError(ErrorCode.ADAPTER_REFUSED, str(exc))


@router.get("/engines")
async def list_engines(state: StateDep) -> dict[str, Any]:
    """The engines behind this gateway: health, load, the adapters each holds."""
    return {"object": "list", "data": state.engine.describe()}


@router.get("/adapters")
def list_adapters(state: StateDep) -> dict[str, Any]:
    store, registry = state.adapters.store, state.adapters
    data = []
    for alias in store.aliases():
        stable, serving = store.stable(alias), store.serving(alias)
        versions = [
            {
                "version": v.version,
                "ref": v.ref,
                "retired": store.is_retired(v),
                "gate_passed": (store.gate(v) or {}).get("passed"),
                "loaded": v.ref in registry.loaded,
                "in_flight": registry.in_flight.get(v.ref, 0),
            }
            for v in store.versions(alias)
        ]
        data.append(
            {
                "alias": alias,
                "stable": stable.version if stable else None,
                "serving": serving.version if serving else None,
                "versions": versions,
            }
        )
    return {"object": "list", "data": data}


@router.get("/adapters/{alias}/versions/{version}")
async def show_version(alias: str, version: int, state: StateDep) -> dict[str, Any]:
    """One version: its manifest, gate verdict, and whether it is stable, retired, loaded and busy."""
    store: AdapterStore = state.adapters.store
    try:
        target = store.get(alias, version)
    except StoreError as exc:
        raise _store_refused(exc) from exc
    try:
        manifest = target.manifest()
    except ManifestError as exc:
        raise APIError(ErrorCode.ADAPTER_REFUSED, str(exc)) from exc
    stable = store.stable(alias)
    return {
        "alias": alias,
        "version": version,
        "ref": target.ref,
        "stable": stable == target,
        "serving": store.serving(alias) == target,
        "retired": store.is_retired(target),
        "gate": store.gate(target),
        "loaded": target.ref in state.adapters.loaded,
        "in_flight": state.adapters.in_flight.get(target.ref, 0),
        "manifest": manifest.model_dump(mode="json", exclude={"prompt_format": {"chat_template"}}),
    }


@router.post("/adapters/{alias}/versions", status_code=201)
async def publish(alias: str, request: Request, state: StateDep) -> dict[str, Any]:
    """Publish the next version of ``alias``: JSON ``{"path"}`` under the import root, or a tar/zip body."""
    try:
        check_alias(alias)
    except StoreError as exc:
        raise APIError(ErrorCode.INVALID_ALIAS, str(exc), param="alias") from exc
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    store = state.adapters.store
    if kind == "application/json":
        try:
            body = PublishFromPath.model_validate_json(await request.body())
        except ValueError as exc:
            raise APIError(
                ErrorCode.INVALID_FIELD, 'Send {"path": "<adapter directory under the import root>"}.', param="path"
            ) from exc
        source = _under_import_root(state, body.path)
        version = await asyncio.to_thread(_checked_publish, state, source, alias)
    elif kind in ARCHIVE_TYPES:
        work = store.root / STAGING / staging_name("upload")
        try:
            archive = await _receive_archive(request, work)
            source = await asyncio.to_thread(_unpack, archive, work / "unpacked", state.settings.max_upload_bytes)
            version = await asyncio.to_thread(_checked_publish, state, source, alias)
        finally:
            await asyncio.to_thread(discard, work)
    else:
        raise APIError(
            ErrorCode.UNSUPPORTED_CONTENT_TYPE,
            f"Unsupported content type {kind or '(none)'!r}: send JSON "
            '{"path": ...} or a tar/zip archive (application/x-tar, application/gzip, application/zip).',
            status=415 if kind else 400,
        )
    serving = store.serving(alias) or version
    # Stored either way; a base model no engine serves is said, not refused (its engines may join later).
    unserved = await asyncio.to_thread(state.adapters.unserved, version)
    if unserved:
        log.warning("published %s: %s", version.ref, unserved)
    warnings = [f"{version.ref}: {unserved}"] if unserved else []
    return {
        "alias": alias,
        "version": version.version,
        "ref": version.ref,
        "serving": serving.version,
        "warnings": warnings,
    } | await state.engine.warm(serving)


def _no_canary_running(state: Gateway, alias: str) -> None:
    """A promotion or retirement behind a running canary's back would change what it compares: refused."""
    canary = state.canaries.active.get(alias)
    if canary is not None:
        raise APIError(
            ErrorCode.CANARY_RUNNING,
            f"{alias} has a canary {canary.state} ({alias}@{canary.candidate} against "
            f"{alias}@{canary.stable}); end it first: `lorafleet canary promote|rollback|abort {alias}`.",
            param="alias",
        )


def _under_import_root(state: Gateway, raw: str) -> Path:
    root = import_root_of(state.settings)
    path = Path(raw)
    resolved = (path if path.is_absolute() else root / path).resolve()
    if not resolved.is_relative_to(root):
        raise APIError(
            ErrorCode.OUTSIDE_IMPORT_ROOT,
            f"{raw!r} is outside the import root {root}; copy the adapter there or upload an archive.",
            param="path",
        )
    if not resolved.is_dir():
        raise APIError(ErrorCode.NO_SUCH_PATH, f"{raw!r}: no such adapter directory under {root}.", param="path")
    return resolved


async def _receive_archive(request: Request, work: Path) -> Path:
    """The uploaded archive, streamed to a file in ``work`` as it arrives (never whole in memory; the
    middleware bounds its size and its time, ``serving.http.middleware``)."""
    await asyncio.to_thread(work.mkdir, parents=True)
    path = work / "upload.archive"
    pending, size = [], 0
    with path.open("wb") as out:
        async for chunk in request.stream():
            pending.append(chunk)
            size += len(chunk)
            if size >= UPLOAD_WRITE_BYTES:  # written off the event loop, a MiB at a time
                await asyncio.to_thread(out.write, b"".join(pending))
                pending, size = [], 0
        await asyncio.to_thread(out.write, b"".join(pending))
    return path


def _unpack(archive: Path, work: Path, limit: int) -> Path:
    try:
        return unpack(archive, work, limit)
    except ArchiveError as exc:
        raise APIError(ErrorCode.ARCHIVE_REFUSED, f"Archive refused: {exc}.") from exc


def _checked_publish(state: Gateway, source: Path, alias: str) -> Any:
    problems = state.adapters.fit_problems(source)
    if problems:
        raise APIError(ErrorCode.ADAPTER_REFUSED, "Adapter refused: " + "; ".join(problems))
    try:
        version = state.adapters.store.publish(source, alias)
    except StoreError as exc:
        raise _store_refused(exc) from exc
    state.adapters.changed()
    return version


@router.post("/adapters/{alias}/promote")
async def promote(alias: str, body: PromoteBody, state: StateDep) -> dict[str, Any]:
    """Move the stable pointer (an earlier version rolls back); the version is loaded before this returns."""
    _no_canary_running(state, alias)
    store: AdapterStore = state.adapters.store
    try:
        if "expected_stable" in body.model_fields_set:
            expected = body.expected_stable
        else:  # two gateways promoting at once: the one whose write comes second is told, not silently overridden
            seen = await asyncio.to_thread(store.stable, alias)
            expected = seen.version if seen else None
        event = await asyncio.to_thread(
            store.promote,
            alias,
            body.version,
            force=body.force,
            reason=body.reason,
            actor="admin-api",
            expected=expected,
        )
    except StoreError as exc:
        raise _store_refused(exc) from exc
    state.adapters.changed()
    return event | await state.engine.warm(store.get(alias, body.version))  # loaded where its requests will go


@router.delete("/adapters/{alias}/versions/{version}")
async def retire(alias: str, version: int, state: StateDep, reason: str = "") -> dict[str, Any]:
    """Take a version out of service; it leaves the engine once its in-flight requests finish."""
    _no_canary_running(state, alias)
    store: AdapterStore = state.adapters.store
    try:
        event = await asyncio.to_thread(store.retire, alias, version, reason=reason, actor="admin-api")
    except StoreError as exc:
        raise _store_refused(exc) from exc
    state.adapters.changed()
    target = store.get(alias, version)
    draining = state.adapters.in_flight.get(target.ref, 0)
    await state.adapters.retire(target)
    return event | {"draining_requests": draining}


class PolicyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    json_mode: JsonMode | None = Field(default=None, description="enforce, validate or off; null: the default.")
    default_schema: dict[str, Any] | None = Field(
        default=None, description="Schema for requests without response_format; null: the adapter manifest's."
    )


@router.get("/aliases/{alias}/policy")
async def get_policy(alias: str, state: StateDep) -> dict[str, Any]:
    """The alias's JSON mode and default schema (null: the defaults)."""
    return {"alias": _known_alias(state, alias)} | state.policies.get(alias).as_dict()


@router.put("/aliases/{alias}/policy")
async def set_policy(alias: str, body: PolicyBody, state: StateDep) -> dict[str, Any]:
    """Replace the alias's JSON mode and default schema; ``{}`` restores the defaults."""
    _known_alias(state, alias)
    if body.default_schema is not None:
        await check_client_schema_bounded(body.default_schema, param="default_schema")
    policy = state.policies.set(alias, AliasPolicy(body.json_mode, body.default_schema))
    return {"alias": alias} | policy.as_dict()


@router.get("/aliases/{alias}/rollout")
async def get_rollout(alias: str, state: StateDep) -> dict[str, Any]:
    """How a fine-tuning job's new version of the alias reaches production: the gate's thresholds and the canary
    (a tenant's job may choose its canary within it)."""
    policy = await asyncio.to_thread(state.policies.rollout, _valid_alias(alias))
    return {"alias": alias} | policy.model_dump()


@router.put("/aliases/{alias}/rollout")
async def set_rollout(alias: str, body: RolloutPolicy, state: StateDep) -> dict[str, Any]:
    """Replace the alias's rollout policy (``{}``: the defaults). The alias need not have a version yet: a job's
    first version of it is gated with these thresholds."""
    policy = await asyncio.to_thread(state.policies.set_rollout, _valid_alias(alias), body)
    return {"alias": alias} | policy.model_dump()


def _valid_alias(alias: str) -> str:
    try:
        return check_alias(alias)
    except StoreError as exc:
        raise APIError(ErrorCode.INVALID_ALIAS, str(exc), param="alias") from exc


def _known_alias(state: Gateway, alias: str) -> str:
    if alias not in state.adapters.store.aliases():
        raise APIError(
            ErrorCode.ALIAS_NOT_FOUND,
            f"No alias {alias!r} in the adapter store; publish a version first.",
            param="alias",
        )
    return alias
