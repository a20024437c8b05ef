"""From a checked request to what its engine gets: the version that answers, loaded, and the body it is sent.

``prepare`` authorises the alias, picks the version (a canary's split
applied), routes it to an engine and loads it there (``serving.engines``),
plans the JSON check and function calling (``serving.outputs``), and builds
the typed ``EngineRequest`` that ``serving.engines.dispatch`` sends. The
routes (``serving.http.routes.completions``) check the request before and
relay the answer after.

The alias ``base`` (when granted) is the bare base model: no adapter, the base
model's own chat template, no default schema.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
from collections.abc import Callable
from typing import Any

from contract.store import AdapterVersion
from contract.tools import TOOLS_FORMAT
from serving.engines.adapters import AdapterMisfit
from serving.engines.dispatch import EngineRequest, Target
from serving.engines.fleet import NoEngine, Placement
from serving.engines.protocol import BASE_MODEL_NAME, EngineError
from serving.errors import APIError, ErrorCode
from serving.gateway import Gateway
from serving.outputs.jsoncheck import JsonPlan
from serving.outputs.modes import JsonMode
from serving.outputs.toolcalls import ToolPlan
from serving.records import RequestRecord
from serving.state.limits import Slot
from serving.state.tenants import Tenant

log = logging.getLogger("lorafleet.gateway")

CHAT = "/v1/chat/completions"
# The alias of the bare base model (granted like any alias).
BASE_ALIAS = BASE_MODEL_NAME


async def prepare(
    state: Gateway,
    route: str,
    body: dict[str, Any],
    alias: str,
    tenant: Tenant,
    *,
    json_mode: JsonMode | None,
    user: str,
    record: RequestRecord,
    slot: Slot,
) -> EngineRequest:
    """Route the request to a version of ``alias``, load it, and build what the engine gets.

    ``body`` is the client's, checked (``serving.http.protocol``); ``json_mode`` the request's own choice, if
    any; ``user`` who the request is for, for a canary's sticky assignment.
    """
    target, lease = await _target(state, tenant, alias, user, slot)
    record.alias, record.variant = alias, target.variant
    record.version = target.version.version if target.version is not None else 0
    if target.canary_id is not None:  # the canary judges on what each variant served
        canary_id, variant = target.canary_id, target.variant
        record.on_end.append(lambda r: state.canaries.observe(canary_id, variant, r))
    tools = ToolPlan.from_request(body, target.tools_format, alias) if route == CHAT else None
    policy = await state.policies.aget(alias)
    plan = JsonPlan.for_request(body, target.output_schema, policy, json_mode, tools, state.settings.json_layout)
    record.json_mode = plan.mode
    record.json_judged = json_mode is None and plan.source in ("alias", "adapter")
    body["model"] = target.engine_model
    if route == CHAT and target.chat_template is not None:
        body["chat_template"] = target.chat_template
    # Prefix-cache isolation: a tenant can only hit cache entries its own requests made.
    body["cache_salt"] = _cache_salt(state, tenant)
    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    stream = bool(body.get("stream"))
    if stream:  # token counts for the metrics; the usage chunk reaches the client only if it asked
        body["stream_options"] = (body.get("stream_options") or {}) | {"include_usage": True}
    return EngineRequest(route, body, stream, target, plan, tools, wants_usage, lease)


def _cache_salt(state: Gateway, tenant: Tenant) -> str:
    secret = state.settings.admin_key.get_secret_value() if state.settings.admin_key else "dev"
    return hmac.new(secret.encode(), f"tenant:{tenant.id}".encode(), hashlib.sha256).hexdigest()[:32]


async def _target(
    state: Gateway, tenant: Tenant, alias: str, user: str, slot: Slot
) -> tuple[Target, Callable[[], None]]:
    """The version that serves this request (canary split applied), loaded on the engine it is routed to."""
    if alias not in tenant.aliases:
        if not await state.tenants.granted_now(tenant, alias):  # not even just now (a fine-tuning job's model)
            raise _not_found(alias)
        state.adapters.forget()  # its serving version too: what was cached for it predates the publish
    if alias == BASE_ALIAS:
        chosen = state.engine.pick(None)
        if chosen is None:
            raise _engine_starting()
        state.metrics.routed.labels(chosen.engine, chosen.reason).inc()
        return Target(alias, BASE_MODEL_NAME, None, "stable", None, None, None, TOOLS_FORMAT, chosen.engine), _no_lease
    version = await state.adapters.serving(alias)
    if version is None:
        status = await asyncio.to_thread(state.adapters.store.training, alias)
        if status is None:  # published a moment ago (a fine-tuning job ends its announcement as it publishes)?
            version = await asyncio.to_thread(state.adapters.resolve, alias)
            if version is not None:
                state.adapters.forget()
        if version is None:
            raise _training(alias, status) or _not_found(alias)
    variant, canary_id = "stable", None
    assigned = state.canaries.assign(alias, user, tenant.name)
    if assigned is not None:
        variant, version = assigned
        canary_id = state.canaries.active[alias].id
    placed = await _load(state, version, alias, slot)
    fmt = placed.manifest.prompt_format
    return Target(
        alias,
        placed.engine_model,
        version,
        variant,
        canary_id,
        fmt.chat_template,
        placed.manifest.output_schema,
        fmt.tools_format,
        placed.engine,
    ), placed.release


def _no_lease() -> None:
    return None


def _not_found(alias: str) -> APIError:
    # An alias that exists but belongs to another tenant is reported exactly
    # like one that does not exist: never reveal another tenant's aliases.
    return APIError(
        ErrorCode.MODEL_NOT_FOUND, f"The model '{alias}' does not exist or you do not have access to it.", param="model"
    )


def _training(alias: str, status: dict[str, Any] | None) -> APIError | None:
    """503 with the ETA for a granted alias whose first version is still training."""
    if status is None:
        return None
    eta = status.get("eta_s")
    step, total = status.get("step"), status.get("max_steps")
    progress = f" (step {step} of {total})" if step is not None and total else ""
    if status.get("phase") == "queued":
        progress = " (queued behind another training run)"
    if isinstance(eta, int | float) and eta >= 0:
        retry = max(5, min(600, math.ceil(eta)))
        when = f"it should be servable in about {_duration(eta)}"
    else:
        retry, when = 30, "its time left is not known yet"
    return APIError(
        ErrorCode.MODEL_TRAINING,
        f"The model '{alias}' is still training{progress}; {when}. Retry after that.",
        headers={"Retry-After": str(retry)},
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min"


def _engine_starting() -> APIError:
    return APIError(ErrorCode.ENGINE_STARTING, "The engine is starting; retry shortly.", headers={"Retry-After": "5"})


async def _load(state: Gateway, version: AdapterVersion, alias: str, slot: Slot) -> Placement:
    """Route ``version`` to an engine (``serving.engines``) and load it there; counted on it until ``slot`` ends."""
    try:
        placed = await state.engine.place(version)
    except NoEngine as exc:
        if not exc.unserved:
            raise _engine_starting() from exc
        log.error("%s: %s", version.ref, exc)
        raise APIError(
            ErrorCode.ADAPTER_UNAVAILABLE,
            f"The model '{alias}' is unavailable: no engine serves the base model its adapter was trained on.",
        ) from exc
    except AdapterMisfit as exc:
        log.error("%s", exc)
        raise APIError(
            ErrorCode.ADAPTER_UNAVAILABLE, f"The model '{alias}' is unavailable: its adapter cannot be served."
        ) from exc
    except EngineError as exc:  # the engine is out of routing until its health check passes (Fleet.place)
        raise APIError(
            ErrorCode.ENGINE_UNAVAILABLE,
            "The engine could not load the adapter; retry shortly.",
            headers={"Retry-After": "5"},
        ) from exc
    slot.on_release(placed.release)  # a retirement waits for this request before unloading the version
    return placed
