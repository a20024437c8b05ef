"""``GET /metrics``: the gateway's Prometheus exposition; ``GET /metrics/engine``: vLLM's, relayed.

vLLM listens on loopback only (its API loads adapters by path and has no
auth), so Prometheus reads the engine's metrics through the gateway. Both
routes take the metrics key when ``LORAFLEET_METRICS_KEY`` is set.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from serving.engines.protocol import EngineError
from serving.errors import APIError, ErrorCode
from serving.http.deps import StateDep


def require_metrics_key(request: Request, state: StateDep) -> None:
    expected = state.settings.metrics_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.get_secret_value().encode()
    ):
        raise APIError(ErrorCode.INVALID_METRICS_KEY, "/metrics needs 'Authorization: Bearer <metrics key>'.")


router = APIRouter(dependencies=[Depends(require_metrics_key)])


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/engine")
async def engine_metrics(state: StateDep) -> Response:
    try:
        body = await state.engine.metrics()
    except EngineError as exc:
        raise APIError(
            ErrorCode.ENGINE_UNAVAILABLE,
            "The engine is not reachable; its metrics are not available now.",
            headers={"Retry-After": "5"},
        ) from exc
    return Response(body, media_type=CONTENT_TYPE_LATEST)
