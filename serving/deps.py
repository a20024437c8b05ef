"""Request dependencies: the app's state and the calling tenant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from serving.adapters import AdapterRegistry
from serving.canary import CanaryManager
from serving.config import GatewaySettings
from serving.errors import APIError
from serving.fleet.fleet import Fleet
from serving.limits import RedisLimiter, TenantLimiter
from serving.metrics import GatewayMetrics
from serving.policies import AliasPolicies
from serving.tenants import Tenant, TenantStore


@dataclass
class GatewayState:
    settings: GatewaySettings
    engine: Fleet  # the engines, as one for readiness and restarts; ``pick`` routes a request
    tenants: TenantStore
    adapters: AdapterRegistry
    limiter: TenantLimiter | RedisLimiter
    policies: AliasPolicies
    metrics: GatewayMetrics
    canaries: CanaryManager


async def get_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


StateDep = Annotated[GatewayState, Depends(get_state)]


async def get_tenant(request: Request, state: StateDep) -> Tenant:
    # Async on purpose: FastAPI runs sync dependencies in a thread pool, and a thread hop per request costs
    # milliseconds when vLLM keeps every core busy. Keys known (or known to be bogus) are answered from memory;
    # only a key memory cannot answer is looked up in the database, in a worker thread.
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401,
            "Missing API key: send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    tenant = await state.tenants.aauthenticate(key.strip())
    if tenant is None:
        raise APIError(
            401, "Incorrect API key provided.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]
