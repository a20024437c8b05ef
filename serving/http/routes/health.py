"""Liveness and readiness probes.

``/readyz`` answers whether this gateway can serve: its engine is up (and has
had every alias's adapter offered to it). It names nothing: a load balancer or
a Kubernetes probe needs no tenant's aliases, and one tenant's new or broken
adapter never takes the replica out of service. With the admin key it adds the
details: the engine's restarts, the adapters loaded, the aliases whose
serving version is not (also ``lorafleet_adapters_pending`` in the metrics),
those whose base model no engine serves, and each engine (``/admin/engines``).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.engines.protocol import EngineError
from serving.errors import APIError
from serving.http.deps import StateDep, require_admin

router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, str]:
    """The gateway process is up (``instance``: a random id per start, matched by the CLI against gateway.json)."""
    return {"status": "ok", "instance": getattr(request.app.state, "instance", "")}


@router.get("/readyz")
async def readyz(request: Request, state: StateDep) -> JSONResponse:
    """200 when the engine answers; 503 with ``Retry-After`` while it starts or restarts."""
    ready = state.engine.is_ready()
    body: dict[str, object] = {
        "status": "ready" if ready else "not_ready",
        "reason": None if ready else "the engine is starting",
    }
    if _is_admin(request, state):
        body |= {
            "engine": "ready" if ready else "starting",
            "engine_restarts": state.engine.restarts,
            "adapters_loaded": sorted(state.adapters.loaded),
            "adapters_pending": await asyncio.to_thread(state.adapters.pending, state.engine.several) if ready else [],
            "adapters_unserved": await asyncio.to_thread(state.adapters.unserved_aliases),
            "engine_adapters": await _engine_adapters(state) if ready else None,
            "engines": state.engine.describe(),
        }
    return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})


async def _engine_adapters(state: StateDep) -> list[str] | None:
    """What the engine itself holds (to compare with ``adapters_loaded``); ``None`` if it does not answer."""
    try:
        return await state.engine.adapters()
    except EngineError:
        return None


def _is_admin(request: Request, state: StateDep) -> bool:
    if not request.headers.get("authorization") and state.settings.admin_key is not None:
        return False
    try:
        require_admin(request, state)
    except APIError:
        return False
    return True
