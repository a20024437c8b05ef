"""OpenAI-compatible completion routes: the tenant names an alias, the gateway serves its adapter.

One request goes through three steps, each its own function:

1. ``prepare``: authorise the alias, pick the version (canary split), load the
   adapter, plan the JSON check and function calling, and build the typed
   ``EngineRequest`` (the body vLLM gets, and what the answer is checked with);
2. ``full_response`` for a whole answer, or ``stream_response`` for server-sent
   events: relay the engine's answer, add the JSON verdict, rewrite tool calls.

The alias ``base`` (when granted) is the bare base model: no adapter, the base
model's own chat template, no default schema.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from contract.manifest import AdapterManifest
from contract.store import AdapterVersion
from contract.tools import TOOLS_FORMAT
from serving.adapters import AdapterMisfit
from serving.deps import GatewayState, StateDep, TenantDep
from serving.engine import BASE_MODEL_NAME, EngineError, EngineResponse
from serving.errors import APIError
from serving.jsoncheck import JsonCheck, JsonPlan
from serving.limits import Slot, cap_max_tokens
from serving.metrics import RequestRecord
from serving.observe import record_of
from serving.policies import JsonMode
from serving.schemas import check_client_schema_bounded
from serving.sse import event_data
from serving.tenants import Tenant
from serving.toolcalls import ToolPlan, ToolStream

log = logging.getLogger("lorafleet.gateway")
router = APIRouter(prefix="/v1")

# Fields a client may not set: they would let a request pick the engine's prompt
# rendering, reach an adapter by path, or share another tenant's prefix cache.
GATEWAY_ONLY_FIELDS = ("chat_template", "chat_template_kwargs", "lora_request", "lora_path", "cache_salt")
CHAT = "/v1/chat/completions"
# What a client gets when the engine's stream breaks off after the first byte (OpenAI's error shape, then [DONE]).
BROKEN_STREAM = "engine_stream_broken"
STREAM_BROKEN_EVENT = (
    b'data: {"error": {"message": "The engine stopped answering mid-stream; the answer is incomplete. Retry.", '
    b'"type": "server_error", "param": null, "code": "engine_stream_broken"}}\n\ndata: [DONE]\n\n'
)
# The alias of the bare base model (granted like any alias).
BASE_ALIAS = BASE_MODEL_NAME


class GatewayOptions(BaseModel):
    """The request's own ``lorafleet`` object (``extra_body`` in the openai client); never sent to vLLM."""

    model_config = ConfigDict(extra="forbid")

    json_mode: JsonMode | None = Field(default=None, description="enforce, validate or off, for this request.")


class CompletionRequestBase(BaseModel):
    """The fields the gateway itself reads; everything else goes to the engine as sent."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, description="The alias; empty means the tenant's default alias.")
    stream: bool = False
    n: int = Field(default=1, ge=1, le=16)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    lorafleet: GatewayOptions | None = None


class ChatCompletionRequest(CompletionRequestBase):
    messages: list[dict[str, Any]] = Field(min_length=1)


class CompletionRequest(CompletionRequestBase):
    prompt: str | list[str] = Field(min_length=1)


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


@dataclass(frozen=True)
class Target:
    """What answers a request: an adapter version (``version``) or the bare base model (``version`` None)."""

    alias: str
    engine_model: str  # the engine-side name: "orders@3", or "base"
    version: AdapterVersion | None
    variant: str  # "stable" or "canary"
    canary_id: int | None
    chat_template: str | None  # None: the engine's own (the base model's)
    output_schema: dict[str, Any] | None
    tools_format: str | None


@dataclass
class EngineRequest:
    """One request as the engine gets it, and what the gateway needs to check and relay its answer."""

    route: str
    body: dict[str, Any]
    stream: bool
    target: Target
    plan: JsonPlan
    tools: ToolPlan | None
    wants_usage: bool  # the client asked for the usage chunk (the gateway always asks, for its metrics)

    def headers(self) -> dict[str, str]:
        return {"x-lorafleet-adapter": self.target.engine_model, "x-lorafleet-variant": self.target.variant,
                "x-lorafleet-json-mode": self.plan.mode}  # fmt: skip


@router.get("/models")
async def list_models(tenant: TenantDep, state: StateDep) -> ModelList:
    """The aliases the caller may use."""
    cards = [
        ModelCard(id=alias, owned_by="lorafleet")
        for alias in sorted(tenant.aliases)
        if alias == BASE_ALIAS or state.adapters.resolve(alias) is not None
    ]
    return ModelList(data=cards)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    req: ChatCompletionRequest, tenant: TenantDep, state: StateDep, request: Request
) -> Response:
    """Chat completion through the alias's current adapter version (SSE when ``stream`` is true)."""
    return await _proxy(CHAT, req, tenant, state, request)


@router.post("/completions", response_model=None)
async def completions(req: CompletionRequest, tenant: TenantDep, state: StateDep, request: Request) -> Response:
    """Text completion (no chat template) through the alias's current adapter version."""
    return await _proxy("/v1/completions", req, tenant, state, request)


async def _proxy(
    route: str, req: CompletionRequestBase, tenant: Tenant, state: GatewayState, request: Request
) -> Response:
    record = record_of(request.scope) or RequestRecord(uuid.uuid4().hex, request.method, request.url.path)
    record.tenant, record.stream = tenant.name, req.stream
    body = _client_body(route, req, tenant)
    await _check_response_format(body)
    alias = req.model or tenant.default_alias
    if not alias:
        raise APIError(400, "'model' is required: name an alias (see GET /v1/models).", param="model",
                       code="missing_model")  # fmt: skip
    slot = state.limiter.admit(tenant)  # 429 before any work
    try:
        call = await prepare(route, req, alias, body, tenant, state, request, record, slot)
        record.upstream_at = time.perf_counter()  # the gateway's own work ends here
        upstream = await state.engine.send(
            route, call.body, stream=call.stream, request_id=record.request_id, on_sent=record.mark_sent
        )
    except EngineError as exc:
        slot.release()
        raise _engine_unavailable() from exc
    except BaseException:
        slot.release()
        raise
    if upstream.status_code != 200 or not call.stream:
        return await full_response(upstream, call, record, slot)
    return stream_response(upstream, call, record, slot)


def _client_body(route: str, req: CompletionRequestBase, tenant: Tenant) -> dict[str, Any]:
    """The client's fields, checked: none the gateway sets, tools only on chat, ``max_tokens`` within the limit."""
    body = req.model_dump(exclude_none=True)
    for name in GATEWAY_ONLY_FIELDS:
        if name in body:
            raise APIError(
                400, f"'{name}' is set by the gateway and cannot be sent.", param=name, code="forbidden_field"
            )
    body.pop("lorafleet", None)
    cap_max_tokens(body, tenant)
    if route != CHAT and ("tools" in body or "tool_choice" in body):
        raise APIError(400, "'tools' are for /v1/chat/completions.", param="tools", code="invalid_tools")
    return body


async def _check_response_format(body: dict[str, Any]) -> None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        await check_client_schema_bounded((fmt.get("json_schema") or {}).get("schema"))


async def prepare(
    route: str,
    req: CompletionRequestBase,
    alias: str,
    body: dict[str, Any],
    tenant: Tenant,
    state: GatewayState,
    request: Request,
    record: RequestRecord,
    slot: Slot,
) -> EngineRequest:
    """Route the request to a version of ``alias``, load it, and build what the engine gets."""
    target = await _target(state, tenant, alias, _user(request, body), slot)
    record.alias, record.variant = alias, target.variant
    record.version = target.version.version if target.version is not None else 0
    if target.canary_id is not None:  # the canary judges on what each variant served
        canary_id, variant = target.canary_id, target.variant
        record.on_end.append(lambda r: state.canaries.observe(canary_id, variant, r))
    options = req.lorafleet or GatewayOptions()
    tools = ToolPlan.from_request(body, target.tools_format, alias) if route == CHAT else None
    plan = JsonPlan.for_request(body, target.output_schema, state.policies.get(alias), options.json_mode, tools)
    record.json_mode = plan.mode
    body["model"] = target.engine_model
    if route == CHAT and target.chat_template is not None:
        body["chat_template"] = target.chat_template
    # Prefix-cache isolation: a tenant can only hit cache entries its own requests made.
    body["cache_salt"] = _cache_salt(state, tenant)
    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if req.stream:  # token counts for the metrics; the usage chunk reaches the client only if it asked
        body["stream_options"] = (body.get("stream_options") or {}) | {"include_usage": True}
    return EngineRequest(route, body, req.stream, target, plan, tools, wants_usage)


async def full_response(upstream: EngineResponse, call: EngineRequest, record: RequestRecord, slot: Slot) -> Response:
    """A whole answer (or the engine's error): the JSON verdict added, tool calls rewritten."""
    try:
        content = await upstream.aread()
    except EngineError as exc:
        raise _engine_unavailable() from exc
    finally:
        await upstream.aclose()
        slot.release()
    headers = call.headers()
    check = call.plan.check()
    if upstream.status_code == 200:
        data = json.loads(content)
        record.usage(data.get("usage"))
        if check is not None:
            check.add_to(data)
            headers["x-lorafleet-json"] = check.outcome
            record.json_outcomes = [c["outcome"] for c in check.checks]
        if call.tools is not None:
            call.tools.rewrite_body(data)
        if check is not None or call.tools is not None:
            content = json.dumps(data, ensure_ascii=False).encode()
    return Response(content, upstream.status_code, headers=headers, media_type="application/json")


def stream_response(upstream: EngineResponse, call: EngineRequest, record: RequestRecord, slot: Slot) -> Response:
    """Server-sent events relayed one at a time, the JSON verdict as the last event before ``[DONE]``."""
    tools = ToolStream(call.tools) if call.tools is not None else None
    relay = _relay(upstream, slot, record, call.plan.check(), tools, call.wants_usage)
    return RelayResponse(relay, headers=call.headers(), media_type="text/event-stream")


class RelayResponse(StreamingResponse):
    """A stream whose relay is always closed, also when the client hangs up while it waits at a ``yield``.

    Closing it closes the engine connection (vLLM then aborts the generation)
    and releases the request's slot and adapter lease.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            body = self.body_iterator
            if isinstance(body, AsyncGenerator):
                await body.aclose()


def _engine_unavailable() -> APIError:
    return APIError(
        503, "The engine is not reachable; retry shortly.", code="engine_unavailable", headers={"Retry-After": "5"}
    )


def _user(request: Request, body: dict[str, Any]) -> str:
    """Who the request is for, for sticky canary assignment: ``user``, else the header, else the API key."""
    user = body.get("user") or request.headers.get("x-lorafleet-user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    key = request.headers.get("authorization", "")
    return "key:" + hashlib.sha256(key.encode()).hexdigest()


def _cache_salt(state: GatewayState, tenant: Tenant) -> str:
    secret = state.settings.admin_key.get_secret_value() if state.settings.admin_key else "dev"
    return hmac.new(secret.encode(), f"tenant:{tenant.id}".encode(), hashlib.sha256).hexdigest()[:32]


async def _relay(
    upstream: EngineResponse,
    slot: Slot,
    record: RequestRecord,
    check: JsonCheck | None,
    tools: ToolStream | None,
    wants_usage: bool,
) -> AsyncIterator[bytes]:
    """Relay the engine's server-sent events, one event at a time.

    The first event marks the first token; the usage event gives the token
    counts (and is dropped if the client did not ask for it). With a JSON check
    its verdict is the last event before ``[DONE]``; with tools, answers become
    ``tool_calls`` (``ToolStream``).
    """
    try:
        pending = b""
        try:
            async for chunk in upstream.aiter_bytes():
                if record.first_token is None:
                    record.first_token = time.perf_counter()
                pending += chunk
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    usage_event = b'"choices":[]' in event and b'"usage"' in event  # vLLM's usage event
                    # Parsed once, and only when something reads it.
                    data = event_data(event) if usage_event or check is not None or tools is not None else None
                    if usage_event:
                        record.usage((data or {}).get("usage"))
                        if not wants_usage:
                            continue
                    if event.strip() == b"data: [DONE]" and check is not None:
                        yield check.final_event()
                        record.json_outcomes = [c["outcome"] for c in check.checks]
                    elif check is not None and data is not None:
                        check.observe(data)
                    for out in tools.on_event(event + b"\n\n", data) if tools is not None else [event + b"\n\n"]:
                        yield out
        except EngineError:
            # The status line went out long ago: the client learns of the break from an error event, and the
            # stream still ends the way every SSE client waits for.
            record.error_code = BROKEN_STREAM
            yield STREAM_BROKEN_EVENT
            return
        if pending:
            yield pending
    finally:
        record.finished = time.perf_counter()
        await upstream.aclose()
        slot.release()


async def _target(state: GatewayState, tenant: Tenant, alias: str, user: str, slot: Slot) -> Target:
    """The version that serves this request (canary split applied), loaded on the engine."""
    if alias not in tenant.aliases:
        raise _not_found(alias)
    if alias == BASE_ALIAS:
        _require_engine(state)
        return Target(alias, BASE_MODEL_NAME, None, "stable", None, None, None, TOOLS_FORMAT)
    version = state.adapters.resolve(alias)
    if version is None:
        raise _training(alias, state.adapters.store.training(alias)) or _not_found(alias)
    variant, canary_id = "stable", None
    assigned = state.canaries.assign(alias, user)
    if assigned is not None:
        variant, version = assigned
        canary_id = state.canaries.active[alias].id
    manifest = await _load(state, version, alias, slot)
    return Target(alias, version.ref, version, variant, canary_id, manifest.prompt_format.chat_template,
                  manifest.output_schema, manifest.prompt_format.tools_format)  # fmt: skip


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


def _require_engine(state: GatewayState) -> None:
    if not state.engine.is_ready():
        raise APIError(
            503, "The engine is starting; retry shortly.", code="engine_starting", headers={"Retry-After": "5"}
        )


async def _load(state: GatewayState, version: AdapterVersion, alias: str, slot: Slot) -> AdapterManifest:
    _require_engine(state)
    # Counted from here, so a retirement waits for this request before unloading the version.
    slot.on_release(state.adapters.lease(version))
    try:
        return await state.adapters.ensure_loaded(version)
    except AdapterMisfit as exc:
        log.error("%s", exc)
        raise APIError(
            503, f"The model '{alias}' is unavailable: its adapter cannot be served.", code="adapter_unavailable"
        ) from exc
    except EngineError as exc:
        raise APIError(
            503,
            "The engine could not load the adapter; retry shortly.",
            code="engine_unavailable",
            headers={"Retry-After": "5"},
        ) from exc
