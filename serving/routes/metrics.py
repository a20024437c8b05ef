"""``GET /metrics``: the gateway's Prometheus exposition (vLLM's own is on the engine's port)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from serving.deps import StateDep
from serving.errors import APIError

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request, state: StateDep) -> Response:
    expected = state.settings.metrics_key
    if expected is not None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), expected.get_secret_value().encode()
        ):
            raise APIError(401, "/metrics needs 'Authorization: Bearer <metrics key>'.", code="invalid_metrics_key")
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
