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

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from contract.store import AdapterVersion
from contract.tools import TOOLS_FORMAT
from serving.adapters import AdapterMisfit
from serving.config import GatewaySettings
from serving.deps import GatewayState, StateDep, TenantDep
from serving.engine import BASE_MODEL_NAME, EngineError, EngineResponse
from serving.errors import APIError, error_body
from serving.fleet.fleet import NoEngine, Placement
from serving.jsoncheck import JsonCheck, JsonPlan
from serving.limits import Slot, cap_max_tokens
from serving.metrics import RequestRecord
from serving.observe import record_of
from serving.protocol import ChatRequest, GatewayOptions, RequestBase, TextRequest, filter_response
from serving.schemas import bounded, check_client_schema
from serving.sse import event_data
from serving.tenants import Tenant
from serving.toolcalls import ToolPlan, ToolStream, check_tools

log = logging.getLogger("lorafleet.gateway")
router = APIRouter(prefix="/v1")

CHAT = "/v1/chat/completions"
# What a client gets when the engine's stream breaks off after the first byte (OpenAI's error shape, then [DONE]).
BROKEN_STREAM = "engine_stream_broken"
ENGINE_STREAM_ERROR = "engine_stream_error"
STREAM_BROKEN_EVENT = (
    b'data: {"error": {"message": "The engine stopped answering mid-stream; the answer is incomplete. Retry.", '
    b'"type": "server_error", "param": null, "code": "engine_stream_broken"}}\n\ndata: [DONE]\n\n'
)
# vLLM's error for a schema its grammar backend cannot compile ("Unimplemented keys: [\"not\"]").
UNIMPLEMENTED = re.compile(r"[Uu]nimplemented keys?:?\s*(\[[^\]]*\])")
# The alias of the bare base model (granted like any alias).
BASE_ALIAS = BASE_MODEL_NAME


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
    engine: str  # the engine it was routed to (serving.fleet)


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
    lease: Callable[[], None] = lambda: None  # ends the request's count on its version and engine

    def headers(self) -> dict[str, str]:
        headers = {"x-lorafleet-adapter": self.target.engine_model, "x-lorafleet-variant": self.target.variant,
                   "x-lorafleet-json-mode": self.plan.mode}  # fmt: skip
        if self.plan.unenforced:
            headers["x-lorafleet-json-unenforced"] = ",".join(self.plan.unenforced)
        return headers


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
        upstream = await _send(state, call, record, slot)
    except EngineError as exc:
        slot.release()
        raise _engine_unavailable() from exc
    except BaseException:
        slot.release()
        raise
    if upstream.status_code != 200:
        return await full_response(upstream, call, record, slot)
    return stream_response(upstream, call, record, slot)


async def _whole_answer(state: GatewayState, call: EngineRequest, record: RequestRecord, slot: Slot) -> Response:
    return await full_response(await _send(state, call, record, slot), call, record, slot)


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


async def _send(state: GatewayState, call: EngineRequest, record: RequestRecord, slot: Slot) -> EngineResponse:
    """Send ``call`` to its engine, and again, before any byte reached the client, when

    - the engine cannot be reached, or answers 502/503: once, on another engine (``serving.fleet``), the failed
      one out of routing until its health check passes;
    - it does not have the adapter (it restarted, or a retirement raced this request): reloaded, then sent again;
    - it cannot enforce the schema (a keyword its grammar backend lacks, such as ``not``): sent without the
      constraint, the answer checked in validate mode and flagged (``unenforced_keywords``).
    """
    retried: set[str] = set()
    while True:
        record.engine_request_id = f"gw{secrets.token_hex(6)}-{record.request_id}"  # the gateway's own, unique
        engine = state.engine.members.get(call.target.engine)
        try:
            if engine is None:  # removed (discovery) since the request was routed
                raise EngineError(f"engine {call.target.engine} is gone")
            upstream = await engine.send(call.route, call.body, stream=call.stream,
                                         request_id=record.engine_request_id, on_sent=record.mark_sent)  # fmt: skip
        except EngineError:
            if "failover" in retried or not await _fail_over(state, call, slot):
                raise
            retried.add("failover")
            continue
        if upstream.status_code in (502, 503) and "failover" not in retried:
            content = await _read_whole(upstream)
            if await _fail_over(state, call, slot):
                retried.add("failover")
                continue
            return ReadResponse(upstream.status_code, content)
        if upstream.status_code == 200 and call.stream and call.plan.mode == "enforce" and "schema" not in retried:
            # vLLM reports a schema it cannot compile inside a 200 stream, as its first event: looked at before
            # anything reaches the client, and handled like the 400 a whole answer gets.
            peeked = await PeekedStream.of(upstream)
            keywords = unimplemented(peeked.first) if b'"error"' in peeked.first else ()
            if not keywords:
                return peeked
            await peeked.aclose()
            call.plan = call.plan.validate_instead(call.body, keywords)
            retried.add("schema")
            continue
        if upstream.status_code not in (400, 404):
            return upstream
        content = await _read_whole(upstream)
        version = call.target.version
        missing = upstream.status_code == 404 and version is not None and _adapter_missing(content, version.ref)
        if missing and version is not None and "reload" not in retried:
            log.warning("engine %s lost adapter %s; reloading it", call.target.engine, version.ref)
            await state.adapters.reload(version, call.target.engine)
            retried.add("reload")
            continue
        keywords = unimplemented(content) if upstream.status_code == 400 and call.plan.mode == "enforce" else ()
        if keywords and "schema" not in retried:
            call.plan = call.plan.validate_instead(call.body, keywords)
            retried.add("schema")
            continue
        return ReadResponse(upstream.status_code, content)


async def _fail_over(state: GatewayState, call: EngineRequest, slot: Slot) -> bool:
    """Move ``call`` to another engine (its adapter loaded there); ``False`` when there is none."""
    failed = call.target.engine
    state.engine.mark_down(failed)
    version = call.target.version
    if version is None:
        chosen = state.engine.pick(None, exclude={failed})
        if chosen is None:
            return False
        engine, model = chosen.engine, BASE_MODEL_NAME
    else:
        try:
            placed = await state.engine.place(version, exclude={failed})
        except (NoEngine, EngineError, AdapterMisfit):
            return False
        call.lease()  # its count moves to the new engine
        call.lease = placed.release
        slot.on_release(placed.release)
        engine, model = placed.engine, placed.engine_model
    log.warning("engine %s failed a request before its first byte: retrying it on %s", failed, engine)
    call.target = dataclasses.replace(call.target, engine=engine, engine_model=model)
    call.body["model"] = model
    state.metrics.failovers.labels(failed).inc()
    return True


async def _read_whole(upstream: EngineResponse) -> bytes:
    try:
        return await upstream.aread()
    finally:
        await upstream.aclose()


class PeekedStream:
    """A streamed engine answer whose first chunk was read ahead (an ``EngineResponse``)."""

    def __init__(self, upstream: EngineResponse, chunks: AsyncIterator[bytes], first: bytes) -> None:
        self.status_code, self._upstream, self._chunks, self.first = upstream.status_code, upstream, chunks, first

    @classmethod
    async def of(cls, upstream: EngineResponse) -> PeekedStream:
        chunks = upstream.aiter_bytes()
        try:
            first = await anext(chunks, b"")
        except BaseException:
            await upstream.aclose()
            raise
        return cls(upstream, chunks, first)

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        if self.first:
            yield self.first
        async for chunk in self._chunks:
            yield chunk

    async def aread(self) -> bytes:
        return self.first + b"".join([chunk async for chunk in self._chunks])

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()
        await self._upstream.aclose()


@dataclass
class ReadResponse:
    """An engine answer already read whole (an ``EngineResponse``)."""

    status_code: int
    content: bytes

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        yield self.content

    async def aread(self) -> bytes:
        return self.content

    async def aclose(self) -> None:
        return None


def _adapter_missing(content: bytes, ref: str) -> bool:
    """vLLM's 404 for a model name it does not serve (``The model `orders@3` does not exist.``)."""
    return ref.encode() in content and b"does not exist" in content


def unimplemented(content: bytes) -> tuple[str, ...]:
    """The JSON Schema keywords vLLM's grammar backend reported it cannot enforce (none: an empty tuple)."""
    found = UNIMPLEMENTED.search(content.decode(errors="replace"))
    return tuple(re.findall(r'\\?"([^"\\]+)\\?"', found.group(1))) if found else ()


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
    if upstream.status_code != 200:
        raise _engine_refused(upstream.status_code, content, record)
    check = call.plan.check()
    data = filter_response(json.loads(content))
    record.usage(data.get("usage"))
    if check is not None:
        check.add_to(data)
        headers["x-lorafleet-json"] = check.outcome
        record.json_outcomes = [c["outcome"] for c in check.checks]
    if call.tools is not None:
        call.tools.rewrite_body(data)
    return Response(json.dumps(data, ensure_ascii=False).encode(), 200, headers=headers, media_type="application/json")


def _engine_refused(status: int, content: bytes, record: RequestRecord) -> APIError:
    """The engine's own error (a prompt beyond the context, a schema its grammar cannot compile, ...) in the
    gateway's error shape: its message kept, its exception type and version not."""
    try:
        message = str(json.loads(content)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = content.decode(errors="replace")[:500]
    if status == 503:  # overloaded or starting: the client may retry
        log.warning("engine answered 503: %s", message)
        return _engine_unavailable()
    if status >= 500:
        log.error("engine answered %d: %s", status, message)
        return APIError(502, "The engine failed on this request; retry, or report it with the x-request-id header.",
                        code="engine_error")  # fmt: skip
    return APIError(status if 400 <= status < 500 else 502, message, code="engine_rejected")


def stream_response(upstream: EngineResponse, call: EngineRequest, record: RequestRecord, slot: Slot) -> Response:
    """Server-sent events relayed one at a time, the JSON verdict as the last event before ``[DONE]``."""
    tools = ToolStream(call.tools) if call.tools is not None else None
    closed = False

    async def close() -> None:
        nonlocal closed
        if not closed:
            closed = True
            record.finished = record.finished or time.perf_counter()
            await upstream.aclose()
            slot.release()

    relay = _relay(upstream, record, call.plan.check(), tools, call.wants_usage, close)
    return RelayResponse(relay, close, headers=call.headers(), media_type="text/event-stream")


class RelayResponse(StreamingResponse):
    """A stream whose relay is always closed, also when the client hangs up while it waits at a ``yield``, or
    before its first byte (the relay then never started, and its own ``finally`` never runs).

    Closing it closes the engine connection (vLLM then aborts the generation)
    and releases the request's slot and adapter lease.
    """

    def __init__(self, content: AsyncIterator[bytes], close: Callable[[], Awaitable[None]], **kw: Any) -> None:
        super().__init__(content, **kw)
        self.close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            body = self.body_iterator
            if isinstance(body, AsyncGenerator):
                await body.aclose()
            await self.close()


def _stream_error(data: dict[str, Any]) -> dict[str, Any]:
    """An error event of the engine's, as the gateway words one: its message for a request the engine refused,
    none of its internals for a failure of its own."""
    found = data.get("error")
    error: dict[str, Any] = found if isinstance(found, dict) else {}
    code = error.get("code")
    if isinstance(code, int) and 400 <= code < 500:
        return error_body(code, str(error.get("message", "The engine refused the request.")), "engine_rejected")
    log.error("engine stream error: %s", error)
    return error_body(502, "The engine failed on this request; the answer is incomplete. Retry, or report it with "
                      "the x-request-id header.", "engine_error")  # fmt: skip


def _engine_unavailable() -> APIError:
    return APIError(
        503, "The engine is not reachable; retry shortly.", code="engine_unavailable", headers={"Retry-After": "5"}
    )


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


async def _relay(
    upstream: EngineResponse,
    record: RequestRecord,
    check: JsonCheck | None,
    tools: ToolStream | None,
    wants_usage: bool,
    close: Callable[[], Awaitable[None]],
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
                    # Every event is parsed and relayed with OpenAI's fields only (``serving.protocol``).
                    data = event_data(event)
                    if data is not None and "error" in data:  # vLLM's error event, in the gateway's shape
                        record.error_code = ENGINE_STREAM_ERROR
                        yield b"data: " + json.dumps(_stream_error(data)).encode() + b"\n\n"
                        continue
                    if data is not None:
                        data = filter_response(data)
                        event = b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
                    usage_event = data is not None and not data.get("choices") and "usage" in data
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
        await close()


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
