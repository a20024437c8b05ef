"""OpenAI-compatible completion routes: the tenant names an alias, the gateway serves its adapter."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from contract.manifest import AdapterManifest
from contract.store import AdapterVersion
from serving.adapters import AdapterMisfit
from serving.deps import GatewayState, StateDep, TenantDep
from serving.engine import EngineError, EngineResponse
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


@router.get("/models")
async def list_models(tenant: TenantDep, state: StateDep) -> ModelList:
    """The aliases the caller may use."""
    cards = [
        ModelCard(id=alias, owned_by="lorafleet")
        for alias in sorted(tenant.aliases)
        if state.adapters.resolve(alias) is not None
    ]
    return ModelList(data=cards)


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    req: ChatCompletionRequest, tenant: TenantDep, state: StateDep, request: Request
) -> Response:
    """Chat completion through the alias's current adapter version (SSE when ``stream`` is true)."""
    return await _proxy("/v1/chat/completions", req, tenant, state, request)


@router.post("/completions", response_model=None)
async def completions(req: CompletionRequest, tenant: TenantDep, state: StateDep, request: Request) -> Response:
    """Text completion (no chat template) through the alias's current adapter version."""
    return await _proxy("/v1/completions", req, tenant, state, request)


def _record(request: Request) -> RequestRecord:
    return record_of(request.scope) or RequestRecord(uuid.uuid4().hex, request.method, request.url.path)


def _user(request: Request, body: dict[str, Any]) -> str:
    """Who the request is for, for sticky canary assignment: ``user``, else the header, else the API key."""
    user = body.get("user") or request.headers.get("x-lorafleet-user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    key = request.headers.get("authorization", "")
    return "key:" + hashlib.sha256(key.encode()).hexdigest()


async def _proxy(
    route: str, req: CompletionRequestBase, tenant: Tenant, state: GatewayState, request: Request
) -> Response:
    record = _record(request)
    record.tenant, record.stream = tenant.name, req.stream
    body = req.model_dump(exclude_none=True)
    for name in GATEWAY_ONLY_FIELDS:
        if name in body:
            raise APIError(
                400, f"'{name}' is set by the gateway and cannot be sent.", param=name, code="forbidden_field"
            )
    body.pop("lorafleet", None)
    options = req.lorafleet or GatewayOptions()
    cap_max_tokens(body, tenant)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        await check_client_schema_bounded((fmt.get("json_schema") or {}).get("schema"))
    if route != "/v1/chat/completions" and ("tools" in body or "tool_choice" in body):
        raise APIError(400, "'tools' are for /v1/chat/completions.", param="tools", code="invalid_tools")
    alias = req.model or tenant.default_alias
    if not alias:
        raise APIError(400, "'model' is required: name an alias (see GET /v1/models).", param="model",
                       code="missing_model")  # fmt: skip
    slot = state.limiter.admit(tenant)  # 429 before any work
    try:
        version, variant, canary_id = _route(state, tenant, alias, _user(request, body))
        record.alias, record.version, record.variant = alias, version.version, variant
        if canary_id is not None:  # the canary judges on what each variant served
            record.on_end.append(lambda r: state.canaries.observe(canary_id, variant, r))
        manifest = await _load(state, version, alias, slot)
        tools = ToolPlan.from_request(body, manifest, alias) if route == "/v1/chat/completions" else None
        plan = JsonPlan.for_request(body, manifest, state.policies.get(alias), options.json_mode, tools)
        record.json_mode = plan.mode
        body["model"] = version.ref
        if route == "/v1/chat/completions":
            body["chat_template"] = manifest.prompt_format.chat_template
        # Prefix-cache isolation: a tenant can only hit cache entries its own requests made.
        body["cache_salt"] = _cache_salt(state, tenant)
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if req.stream:  # token counts for the metrics; the usage chunk reaches the client only if it asked
            body["stream_options"] = (body.get("stream_options") or {}) | {"include_usage": True}
        record.upstream_at = time.perf_counter()  # the gateway's own work ends here
        upstream = await state.engine.send(
            route, body, stream=req.stream, request_id=record.request_id, on_sent=record.mark_sent
        )
    except EngineError as exc:
        slot.release()
        raise _engine_unavailable() from exc
    except BaseException:
        slot.release()
        raise
    headers = {"x-lorafleet-adapter": version.ref, "x-lorafleet-variant": variant, "x-lorafleet-json-mode": plan.mode}
    check = plan.check()
    if upstream.status_code != 200 or not req.stream:
        try:
            content = await upstream.aread()
        except EngineError as exc:
            raise _engine_unavailable() from exc
        finally:
            await upstream.aclose()
            slot.release()
        if upstream.status_code == 200:
            data = json.loads(content)
            record.usage(data.get("usage"))
            if check is not None:
                check.add_to(data)
                headers["x-lorafleet-json"] = check.outcome
                record.json_outcomes = [c["outcome"] for c in check.checks]
            if tools is not None:
                tools.rewrite_body(data)
            if check is not None or tools is not None:
                content = json.dumps(data, ensure_ascii=False).encode()
        return Response(content, upstream.status_code, headers=headers, media_type="application/json")
    relay = _relay(upstream, slot, record, check, ToolStream(tools) if tools is not None else None, wants_usage)
    return RelayResponse(relay, headers=headers, media_type="text/event-stream")


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
        if pending:
            yield pending
    finally:
        record.finished = time.perf_counter()
        await upstream.aclose()
        slot.release()


def _route(state: GatewayState, tenant: Tenant, alias: str, user: str) -> tuple[AdapterVersion, str, int | None]:
    """The version that serves this request, its variant, and the canary it counts for (if any)."""
    # An alias that exists but belongs to another tenant is reported exactly
    # like one that does not exist: never reveal another tenant's aliases.
    version = state.adapters.resolve(alias) if alias in tenant.aliases else None
    if version is None:
        raise APIError(
            404,
            f"The model '{alias}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    assigned = state.canaries.assign(alias, user)
    if assigned is None:
        return version, "stable", None
    variant, chosen = assigned
    return chosen, variant, state.canaries.active[alias].id


async def _load(state: GatewayState, version: AdapterVersion, alias: str, slot: Slot) -> AdapterManifest:
    if not state.engine.is_ready():
        raise APIError(
            503, "The engine is starting; retry shortly.", code="engine_starting", headers={"Retry-After": "5"}
        )
    # Counted from here, so a retirement waits for this request before unloading the version.
    slot.on_release(state.adapters.lease(version))
    try:
        manifest = await state.adapters.ensure_loaded(version)
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
    return manifest
