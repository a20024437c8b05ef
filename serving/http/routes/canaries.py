"""The admin API of canaries (``serving.canary``); ``lorafleet canary ...`` calls it.

POST /admin/canaries/{alias}            start: {"version", "force"?, "reason"?, steps and thresholds?}
GET  /admin/canaries/{alias}            status: step, weight, samples, the latest comparison per metric
GET  /admin/canaries/{alias}/events     every decision with its numbers and reason
POST /admin/canaries/{alias}/{action}   pause, resume, promote, rollback, abort: {"reason"?}
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from serving.canary.analysis import CanaryConfig
from serving.http.deps import AdminDep, JsonPostDep, StateDep

router = APIRouter(prefix="/admin/canaries", dependencies=[AdminDep, JsonPostDep])


class StartBody(CanaryConfig):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, description="The candidate version of the alias.")
    force: bool = Field(default=False, description="Start without a passing evaluation gate (recorded).")
    reason: str = Field(default="", max_length=2000)


class ActionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=2000)


@router.post("/{alias}", status_code=201)
async def start(alias: str, body: StartBody, state: StateDep) -> dict[str, Any]:
    config = CanaryConfig.model_validate(body.model_dump(include=set(CanaryConfig.model_fields)))
    await state.canaries.start(alias, body.version, config, force=body.force, reason=body.reason)
    return state.canaries.status(alias)


@router.get("/{alias}")
async def status(alias: str, state: StateDep) -> dict[str, Any]:
    return state.canaries.status(alias)


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
    # A refusal is a ``CanaryError``, an ``APIError`` the error handlers answer like any other.
    await getattr(canaries, action)(alias, reason)
    return canaries.status(alias)
