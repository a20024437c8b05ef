"""The admin API's view of fine-tuning jobs: every tenant's, for operators (``lorafleet jobs`` reads the same).

GET  /admin/fine_tuning/jobs                 ``tenant``, ``status`` (repeatable), ``after``, ``limit``
GET  /admin/fine_tuning/jobs/{id}            one job, as its tenant sees it
GET  /admin/fine_tuning/jobs/{id}/events     its events, newest first (``after``, ``limit``)
POST /admin/fine_tuning/jobs/{id}/cancel     cancel it (JSON body ``{}``, like every admin write)
GET  /admin/fine_tuning/workers              the workers heard from in the last ``alive_s`` seconds
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query

from serving.errors import APIError, ErrorCode
from serving.gateway import Gateway
from serving.http.deps import AdminDep, JsonPostDep, StateDep
from serving.http.routes.fine_tuning import refused
from serving.state.jobs import Job, JobError

router = APIRouter(prefix="/admin/fine_tuning", dependencies=[AdminDep, JsonPostDep])


async def _names(state: Gateway) -> dict[int, str]:
    """Every tenant's name, by id (a job shows its tenant as its organisation)."""
    return {t.id: t.name for t in await asyncio.to_thread(state.tenants.all)}


def _shown(job: Job, names: dict[int, str]) -> dict[str, Any]:
    return job.as_openai(names.get(job.tenant_id, str(job.tenant_id)))


@router.get("/jobs")
async def list_all_jobs(
    state: StateDep,
    tenant: str | None = Query(default=None, max_length=64),
    status: list[str] = Query(default=[]),
    after: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=50, ge=1, le=1000),
) -> dict[str, Any]:
    """Every tenant's jobs, newest first."""
    names = await _names(state)
    tenant_id = None
    if tenant is not None:
        tenant_id = next((i for i, name in names.items() if name == tenant), None)
        if tenant_id is None:
            raise APIError(ErrorCode.TENANT_NOT_FOUND, f"No tenant {tenant!r}.", param="tenant")
    try:
        jobs, more = await asyncio.to_thread(
            state.jobs.page, tenant_id, after=after, limit=limit, statuses=tuple(status)
        )
    except JobError as exc:
        raise refused(exc) from exc
    return {"object": "list", "data": [_shown(j, names) for j in jobs], "has_more": more}


@router.get("/jobs/{job_id}")
async def show_job(job_id: str, state: StateDep) -> dict[str, Any]:
    try:
        job = await asyncio.to_thread(state.jobs.get, None, job_id)
    except JobError as exc:
        raise refused(exc) from exc
    names = await _names(state)
    return _shown(job, names)


@router.get("/jobs/{job_id}/events")
async def job_events(
    job_id: str,
    state: StateDep,
    after: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=100, ge=1, le=1000),
) -> dict[str, Any]:
    try:
        events, more = await asyncio.to_thread(state.jobs.events, None, job_id, after, limit)
    except JobError as exc:
        raise refused(exc) from exc
    return {"object": "list", "data": events, "has_more": more}


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, state: StateDep) -> dict[str, Any]:
    """Cancel any tenant's job; its worker stops the training within seconds."""
    try:
        job = await asyncio.to_thread(state.jobs.cancel, None, job_id)
    except JobError as exc:
        raise refused(exc) from exc
    names = await _names(state)
    return _shown(job, names)


@router.get("/workers")
async def list_workers(state: StateDep, alive_s: float = Query(default=30.0, gt=0, le=86400)) -> dict[str, Any]:
    """The fine-tuning workers heard from lately, and the job each runs."""
    return {"object": "list", "data": await asyncio.to_thread(state.jobs.workers, alive_s)}
