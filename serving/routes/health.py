"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.deps import StateDep

router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, str]:
    """The gateway process is up (``instance``: a random id per start, matched by the CLI against gateway.json)."""
    return {"status": "ok", "instance": getattr(request.app.state, "instance", "")}


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    """The engine answers and every alias's current adapter is loaded."""
    engine_ready = state.engine.is_ready()
    pending = state.adapters.pending() if engine_ready else []
    ready = engine_ready and not pending
    body = {
        "status": "ready" if ready else "not_ready",
        "engine": "ready" if engine_ready else "starting",
        "engine_restarts": state.engine.restarts,
        "adapters_loaded": sorted(state.adapters.loaded),
        "adapters_pending": pending,
    }
    return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})
