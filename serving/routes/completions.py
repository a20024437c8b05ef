"""OpenAI-compatible completion routes: the tenant names an alias, the gateway serves its adapter.

One request goes through two steps:

1. ``prepare``: authorise the alias, pick the version (canary split), load the
   adapter, plan the JSON check and function calling, and build the typed
   ``EngineRequest`` (the body vLLM gets, and what the answer is checked with);
2. ``serving.upstream``: send it to its engine (again on another engine, or
   after reloading the adapter, before any byte reached the client), then
   ``full_response`` for a whole answer or ``stream_response`` for server-sent
   events: relay the engine's answer, add the JSON verdict, rewrite tool calls.

The alias ``base`` (when granted) is the bare base model: no adapter, the base
model's own chat template, no default schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from contract.store import AdapterVersion
from contract.tools import TOOLS_FORMAT
from serving.adapters import AdapterMisfit
from serving.config import GatewaySettings
from serving.deps import GatewayState, StateDep, TenantDep
from serving.engine import BASE_MODEL_NAME, EngineError
from serving.errors import APIError
from serving.fleet.fleet import NoEngine, Placement
from serving.jsoncheck import JsonPlan
from serving.limits import Slot, cap_max_tokens
from serving.metrics import RequestRecord
from serving.observe import record_of
from serving.protocol import ChatRequest, GatewayOptions, RequestBase, TextRequest
from serving.schemas import bounded, check_client_schema
from serving.tenants import Tenant
from serving.toolcalls import ToolPlan, check_tools
from serving.upstream import EngineRequest, Target, engine_unavailable, full_response, send, stream_response

log = logging.getLogger("lorafleet.gateway")
router = APIRouter(prefix="/v1")

CHAT = "/v1/chat/completions"
# The alias of the bare base model (granted like any alias).
BASE_ALIAS = BASE_MODEL_NAME


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


@router.get("/models")
async def list_models(tenant: TenantDep, state: StateDep) -> ModelList:
    """The aliases the caller may use."""
    cards = [
        ModelCard(id=alias, owned_by="lorafleet")
        for alias in sorted(tenant.aliases)
        if alias == BASE_ALIAS or await state.adapters.serving(alias) is not None
    ]
    return ModelList(data=cards)


@router.post("/chat/completions", response_model=None)
async def chat_completions(req: ChatRequest, tenant: TenantDep, state: StateDep, request: Request) -> Response:
    """Chat completion through the alias's current adapter version (SSE when ``stream`` is true)."""
    return await _proxy(CHAT, req, tenant, state, request)


@router.post("/completions", response_model=None)
async def completions(req: TextRequest, tenant: TenantDep, state: StateDep, request: Request) -> Response:
    """Text completion (no chat template) through the alias's current adapter version."""
    return await _proxy("/v1/completions", req, tenant, state, request)


async def _proxy(route: str, req: RequestBase, tenant: Tenant, state: GatewayState, request: Request) -> Response:
    record = record_of(request.scope) or RequestRecord(uuid.uuid4().hex, request.method, request.url.path)
    record.tenant, record.stream = tenant.name, req.stream
    record.client_max_tokens = req.max_tokens is not None or getattr(req, "max_completion_tokens", None) is not None
    body, sequences = _client_body(req, tenant, state.settings)
    if "tools" in body or (body.get("response_format") or {}).get("type") == "json_schema":
        await bounded(lambda: _check_schemas(body), "response_format" if "tools" not in body else "tools")
    alias = req.model or tenant.default_alias
    if not alias:
        raise APIError(400, "'model' is required: name an alias (see GET /v1/models).", param="model",
                       code="missing_model")  # fmt: skip
    slot = await state.limiter.acquire(tenant, sequences)  # 429 before any work
    if tenant.limits.tokens_per_minute:  # charged with what the engine says it used, once the request ends
        record.on_end.append(
            lambda r: state.limiter.charge(tenant, (r.prompt_tokens or 0) + (r.completion_tokens or 0))
        )
    try:
        call = await prepare(route, req, alias, body, tenant, state, request, record, slot)
        record.upstream_at = time.perf_counter()  # the gateway's own work ends here
        if not call.stream:  # vLLM sends nothing before the whole answer: the client may leave meanwhile
            return await _unless_client_leaves(request, _whole_answer(state, call, record, slot), record)
        upstream = await send(state, call, record, slot)
    except EngineError as exc:
        slot.release()
        raise engine_unavailable() from exc
    except BaseException:
        slot.release()
        raise
    if upstream.status_code != 200:
        return await full_response(upstream, call, record, slot)
    return stream_response(upstream, call, record, slot)


async def _whole_answer(state: GatewayState, call: EngineRequest, record: RequestRecord, slot: Slot) -> Response:
    return await full_response(await send(state, call, record, slot), call, record, slot)


async def _unless_client_leaves(request: Request, answer: Awaitable[Response], record: RequestRecord) -> Response:
    """``answer``, unless the client disconnects first: then the engine request is cancelled, which closes its
    connection, and vLLM aborts the generation (``vllm:num_requests_running`` drops; vLLM 0.32 counts no
    aborts in its metrics)."""
    work = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        gone.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    record.error_code = "client_disconnected"
    return Response(status_code=499)  # nobody reads it; the access log and metrics do


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _client_body(req: RequestBase, tenant: Tenant, settings: GatewaySettings) -> tuple[dict[str, Any], int]:
    """The client's fields (all typed: ``serving.protocol``) and the sequences they ask for, within the limits."""
    prompts = req.prompts if isinstance(req, TextRequest) else 1
    if prompts > settings.max_prompts:
        raise APIError(400, f"'prompt' holds {prompts} prompts; send at most {settings.max_prompts} per request.",
                       param="prompt", code="too_many_prompts")  # fmt: skip
    sequences = req.n * prompts
    if sequences > settings.max_sequences:
        raise APIError(400, f"n × prompts is {req.n} × {prompts} = {sequences} sequences; the limit is "
                       f"{settings.max_sequences} per request.", param="n", code="too_many_sequences")  # fmt: skip
    body = req.model_dump(exclude_none=True)
    body.pop("lorafleet", None)
    cap_max_tokens(body, tenant, sequences)
    return body, sequences


def _check_schemas(body: dict[str, Any]) -> None:
    """The client's schemas within the limits (``serving.schemas``): its ``response_format`` and its tools."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        check_client_schema((fmt.get("json_schema") or {}).get("schema"))
    if "tools" in body:
        check_tools(body["tools"])


async def prepare(
    route: str,
    req: RequestBase,
    alias: str,
    body: dict[str, Any],
    tenant: Tenant,
    state: GatewayState,
    request: Request,
    record: RequestRecord,
    slot: Slot,
) -> EngineRequest:
    """Route the request to a version of ``alias``, load it, and build what the engine gets."""
    target, lease = await _target(state, tenant, alias, _user(request, body, tenant), slot)
    record.alias, record.variant = alias, target.variant
    record.version = target.version.version if target.version is not None else 0
    if target.canary_id is not None:  # the canary judges on what each variant served
        canary_id, variant = target.canary_id, target.variant
        record.on_end.append(lambda r: state.canaries.observe(canary_id, variant, r))
    options = req.lorafleet or GatewayOptions()
    tools = ToolPlan.from_request(body, target.tools_format, alias) if route == CHAT else None
    policy = await state.policies.aget(alias)
    plan = JsonPlan.for_request(body, target.output_schema, policy, options.json_mode, tools)
    record.json_mode = plan.mode
    body["model"] = target.engine_model
    if route == CHAT and target.chat_template is not None:
        body["chat_template"] = target.chat_template
    # Prefix-cache isolation: a tenant can only hit cache entries its own requests made.
    body["cache_salt"] = _cache_salt(state, tenant)
    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if req.stream:  # token counts for the metrics; the usage chunk reaches the client only if it asked
        body["stream_options"] = (body.get("stream_options") or {}) | {"include_usage": True}
    return EngineRequest(route, body, req.stream, target, plan, tools, wants_usage, lease)


def _user(request: Request, body: dict[str, Any], tenant: Tenant) -> str:
    """Who the request is for, for sticky canary assignment: ``user``, else the header, else the API key;
    within the tenant (two tenants' users never share a point)."""
    user = body.get("user") or request.headers.get("x-lorafleet-user")
    if isinstance(user, str) and user:
        return f"{tenant.id}:user:{user}"
    key = request.headers.get("authorization", "")
    return f"{tenant.id}:key:" + hashlib.sha256(key.encode()).hexdigest()


def _cache_salt(state: GatewayState, tenant: Tenant) -> str:
    secret = state.settings.admin_key.get_secret_value() if state.settings.admin_key else "dev"
    return hmac.new(secret.encode(), f"tenant:{tenant.id}".encode(), hashlib.sha256).hexdigest()[:32]


async def _target(
    state: GatewayState, tenant: Tenant, alias: str, user: str, slot: Slot
) -> tuple[Target, Callable[[], None]]:
    """The version that serves this request (canary split applied), loaded on the engine it is routed to."""
    if alias not in tenant.aliases:
        raise _not_found(alias)
    if alias == BASE_ALIAS:
        chosen = state.engine.pick(None)
        if chosen is None:
            raise _engine_starting()
        state.metrics.routed.labels(chosen.engine, chosen.reason).inc()
        return Target(alias, BASE_MODEL_NAME, None, "stable", None, None, None, TOOLS_FORMAT, chosen.engine), _no_lease
    version = await state.adapters.serving(alias)
    if version is None:
        status = await asyncio.to_thread(state.adapters.store.training, alias)
        raise _training(alias, status) or _not_found(alias)
    variant, canary_id = "stable", None
    assigned = state.canaries.assign(alias, user, tenant.name)
    if assigned is not None:
        variant, version = assigned
        canary_id = state.canaries.active[alias].id
    placed = await _load(state, version, alias, slot)
    fmt = placed.manifest.prompt_format
    return Target(alias, placed.engine_model, version, variant, canary_id, fmt.chat_template,
                  placed.manifest.output_schema, fmt.tools_format, placed.engine), placed.release  # fmt: skip


def _no_lease() -> None:
    return None


def _not_found(alias: str) -> APIError:
    # An alias that exists but belongs to another tenant is reported exactly
    # like one that does not exist: never reveal another tenant's aliases.
    return APIError(404, f"The model '{alias}' does not exist or you do not have access to it.", param="model",
                    code="model_not_found")  # fmt: skip


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
    return APIError(503, f"The model '{alias}' is still training{progress}; {when}. Retry after that.",
                    code="model_training", headers={"Retry-After": str(retry)})  # fmt: skip


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min"


def _engine_starting() -> APIError:
    return APIError(503, "The engine is starting; retry shortly.", code="engine_starting", headers={"Retry-After": "5"})


async def _load(state: GatewayState, version: AdapterVersion, alias: str, slot: Slot) -> Placement:
    """Route ``version`` to an engine (``serving.fleet``) and load it there; counted on it until ``slot`` ends."""
    try:
        placed = await state.engine.place(version)
    except NoEngine as exc:
        if not exc.unserved:
            raise _engine_starting() from exc
        log.error("%s: %s", version.ref, exc)
        raise APIError(503, f"The model '{alias}' is unavailable: no engine serves the base model its adapter was "
                       "trained on.", code="adapter_unavailable") from exc  # fmt: skip
    except AdapterMisfit as exc:
        log.error("%s", exc)
        raise APIError(
            503, f"The model '{alias}' is unavailable: its adapter cannot be served.", code="adapter_unavailable"
        ) from exc
    except EngineError as exc:  # the engine is out of routing until its health check passes (Fleet.place)
        raise APIError(
            503,
            "The engine could not load the adapter; retry shortly.",
            code="engine_unavailable",
            headers={"Retry-After": "5"},
        ) from exc
    slot.on_release(placed.release)  # a retirement waits for this request before unloading the version
    return placed
