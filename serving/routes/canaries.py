"""The admin API of canaries (``serving.canary``); ``lorafleet canary ...`` calls it.

POST /admin/canaries/{alias}            start: {"version", "force"?, "reason"?, steps and thresholds?}
GET  /admin/canaries/{alias}            status: step, weight, samples, the latest comparison per metric
GET  /admin/canaries/{alias}/events     every decision with its numbers and reason
POST /admin/canaries/{alias}/{action}   pause, resume, promote, rollback, abort: {"reason"?}
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from serving.canary import CanaryConfig, CanaryError
from serving.deps import StateDep
from serving.errors import APIError
from serving.routes.admin import require_admin

router = APIRouter(prefix="/admin/canaries", dependencies=[Depends(require_admin)])


class StartBody(CanaryConfig):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, description="The candidate version of the alias.")
    force: bool = Field(default=False, description="Start without a passing evaluation gate (recorded).")
    reason: str = Field(default="", max_length=2000)


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=2000)


def _refused(exc: CanaryError) -> APIError:
    return APIError(exc.status, str(exc), code=exc.code)


@router.post("/{alias}", status_code=201)
async def start(alias: str, body: StartBody, state: StateDep) -> dict[str, Any]:
    config = CanaryConfig.model_validate(body.model_dump(include=set(CanaryConfig.model_fields)))
    try:
        await state.canaries.start(alias, body.version, config, force=body.force, reason=body.reason)
        return state.canaries.status(alias)
    except CanaryError as exc:
        raise _refused(exc) from exc


@router.get("/{alias}")
async def status(alias: str, state: StateDep) -> dict[str, Any]:
    try:
        return state.canaries.status(alias)
    except CanaryError as exc:
        raise _refused(exc) from exc


@router.get("/{alias}/events")
async def events(alias: str, state: StateDep) -> dict[str, Any]:
    return {"object": "list", "data": await asyncio.to_thread(state.canaries.events, alias)}


@router.post("/{alias}/{action}")
async def act(
    alias: str,
    action: Literal["pause", "resume", "promote", "rollback", "abort"],
    state: StateDep,
    body: ActionBody | None = None,
) -> dict[str, Any]:
    reason = body.reason if body else ""
    canaries = state.canaries
    try:
        if action == "pause":
            await canaries.pause(alias, reason)
        elif action == "resume":
            await canaries.resume(alias, reason)
        elif action == "promote":
            await canaries.promote(alias, reason)
        elif action == "rollback":
            await canaries.rollback(alias, reason)
        else:
            await canaries.abort(alias, reason)
        return canaries.status(alias)
    except CanaryError as exc:
        raise _refused(exc) from exc
