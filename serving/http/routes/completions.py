"""OpenAI-compatible completion routes: the tenant names an alias, the gateway serves its adapter.

One request goes through three steps:

1. here: the client's fields checked against the tenant's limits and the
   schema bounds, and a slot taken (429 before any work);
2. ``serving.plan.prepare``: the version that answers, loaded on its engine,
   and the typed ``EngineRequest``;
3. ``serving.engines.dispatch.send`` to its engine (again elsewhere, before any
   byte reached the client, when that fails), then ``serving.http.relay``:
   ``full_response`` for a whole answer or ``stream_response`` for server-sent
   events, with the JSON verdict added and tool calls rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from serving.config import GatewaySettings
from serving.engines.dispatch import EngineRequest, send
from serving.engines.protocol import EngineError
from serving.errors import APIError, ErrorCode
from serving.gateway import Gateway
from serving.http.deps import StateDep, TenantDep
from serving.http.observe import record_of
from serving.http.protocol import ChatRequest, GatewayOptions, RequestBase, TextRequest
from serving.http.relay import engine_failed, full_response, stream_response
from serving.outputs.schemas import check_client_schema
from serving.outputs.toolcalls import check_tools
from serving.plan import BASE_ALIAS, CHAT, prepare
from serving.records import RequestRecord
from serving.state.limits import Slot, cap_max_tokens
from serving.state.tenants import Tenant

router = APIRouter(prefix="/v1")


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


@router.get("/models")
async def list_models(tenant: TenantDep, state: StateDep) -> ModelList:
    """The aliases the caller may use; its own fine-tuned models are ``owned_by`` the tenant."""
    own = {job.fine_tuned_model: job for job in await asyncio.to_thread(state.jobs.models, tenant.id)}
    cards = []
    for alias in sorted(tenant.aliases):
        if alias != BASE_ALIAS and await state.adapters.serving(alias) is None:
            continue
        job = own.get(alias)
        if job is not None:
            cards.append(ModelCard(id=alias, created=job.finished_at or job.created_at, owned_by=tenant.name))
        else:
            cards.append(ModelCard(id=alias, owned_by="lorafleet"))
    return ModelList(data=cards)


@router.delete("/models/{model}")
async def delete_model(model: str, tenant: TenantDep, state: StateDep) -> dict[str, Any]:
    """Delete one of the caller's fine-tuned models: its grant goes at once, its adapter leaves the engines once its
    requests in flight have finished."""
    if model not in tenant.aliases:
        raise APIError(ErrorCode.MODEL_NOT_FOUND, f"The model '{model}' does not exist.", param="model")
    job = await asyncio.to_thread(state.jobs.owned_model, tenant.id, model)
    if job is None:
        raise APIError(
            ErrorCode.MODEL_NOT_OWNED,
            f"The model '{model}' is not a fine-tuned model of yours; only those can be deleted.",
            param="model",
        )
    await asyncio.to_thread(state.tenants.revoke_grant, tenant, model)
    store = state.adapters.store
    for version in await asyncio.to_thread(store.versions, model):
        if not store.is_retired(version):
            reason = "deleted by its tenant"
            await asyncio.to_thread(store.retire, model, version.version, reason=reason, actor=tenant.name)
            await state.adapters.retire(version)
    state.adapters.changed()
    return {"id": model, "object": "model", "deleted": True}


@router.post("/chat/completions", response_model=None)
async def chat_completions(req: ChatRequest, tenant: TenantDep, state: StateDep, request: Request) -> Response:
    """Chat completion through the alias's current adapter version (SSE when ``stream`` is true)."""
    return await _proxy(CHAT, req, tenant, state, request)


@router.post("/completions", response_model=None)
async def completions(req: TextRequest, tenant: TenantDep, state: StateDep, request: Request) -> Response:
    """Text completion (no chat template) through the alias's current adapter version."""
    return await _proxy("/v1/completions", req, tenant, state, request)


async def _proxy(route: str, req: RequestBase, tenant: Tenant, state: Gateway, request: Request) -> Response:
    record = record_of(request.scope) or RequestRecord(uuid.uuid4().hex, request.method, request.url.path)
    record.tenant, record.stream = tenant.name, req.stream
    record.client_max_tokens = req.max_tokens is not None or getattr(req, "max_completion_tokens", None) is not None
    body, sequences = _client_body(req, tenant, state.settings)
    alias = req.model or tenant.default_alias
    if not alias:
        raise APIError(
            ErrorCode.MISSING_MODEL, "'model' is required: name an alias (see GET /v1/models).", param="model"
        )
    slot = await state.limiter.acquire(tenant, sequences)  # 429 before any work
    if tenant.limits.tokens_per_minute:  # charged with what the engine says it used, once the request ends
        most = most_tokens(body, sequences, state.settings.max_model_len)
        record.on_end.append(lambda r: state.limiter.charge(tenant, tokens_used(r, most)))
    try:
        if "tools" in body or (body.get("response_format") or {}).get("type") == "json_schema":  # after the limits
            param = "response_format" if "tools" not in body else "tools"
            await state.schema_checks.run(tenant.id, lambda: _check_schemas(body), param)
        options = req.lorafleet or GatewayOptions()
        user = _user(request, body, tenant)
        call = await prepare(
            state, route, body, alias, tenant, json_mode=options.json_mode, user=user, record=record, slot=slot
        )
        record.upstream_at = time.perf_counter()  # the gateway's own work ends here
        if not call.stream:  # vLLM sends nothing before the whole answer: the client may leave meanwhile
            return await _unless_client_leaves(request, _whole_answer(state, call, record, slot), record)
        upstream = await send(state.engine, state.metrics, call, record, slot)
    except EngineError as exc:
        slot.release()
        raise engine_failed(exc) from exc
    except BaseException:
        slot.release()
        raise
    if upstream.status_code != 200:
        return await full_response(upstream, call, record, slot)
    return stream_response(upstream, call, record, slot)


async def _whole_answer(state: Gateway, call: EngineRequest, record: RequestRecord, slot: Slot) -> Response:
    """The whole answer; the slot (and with it the adapter lease) is released however this ends: answered,
    refused, or cancelled because the client left (``_unless_client_leaves`` then answers 499 normally, and
    nothing above would release it)."""
    try:
        upstream = await send(state.engine, state.metrics, call, record, slot)
    except BaseException:
        slot.release()
        raise
    return await full_response(upstream, call, record, slot)  # it releases the slot itself, in its finally


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


def completion_budget(body: dict[str, Any], max_model_len: int) -> int:
    """The most tokens one sequence may generate: its ``max_tokens`` (either spelling), else the model's length."""
    return int(body.get("max_completion_tokens") or body.get("max_tokens") or max_model_len)


def most_tokens(body: dict[str, Any], sequences: int, max_model_len: int) -> int:
    """The most tokens a request may use: its prompt (estimated at four bytes a token) and every sequence's
    completion budget (``max_tokens``, else the model's length)."""
    prompt = len(json.dumps(body.get("messages") or body.get("prompt") or "", ensure_ascii=False).encode()) // 4
    return prompt + sequences * completion_budget(body, max_model_len)


def tokens_used(record: RequestRecord, most: int) -> int:
    """What a finished request is charged against its tokens per minute: what the engine says it used; when the
    engine never said (the client left, the stream broke off), the most it could have used, so that leaving
    early is no way around the limit."""
    if record.prompt_tokens is not None or record.completion_tokens is not None:
        return (record.prompt_tokens or 0) + (record.completion_tokens or 0)
    # The engine took it (it was written to it) and then it ended without usage: the client left, the stream broke
    # off, or the engine took too long; a request refused before the engine, or by it, costs nothing.
    generating = record.upstream_sent is not None and record.status in (200, 499, 504)
    return most if generating else 0


def _client_body(req: RequestBase, tenant: Tenant, settings: GatewaySettings) -> tuple[dict[str, Any], int]:
    """The client's fields (all typed: ``serving.http.protocol``) and the sequences they ask for, within the limits."""
    prompts = req.prompts if isinstance(req, TextRequest) else 1
    if prompts > settings.max_prompts:
        raise APIError(
            ErrorCode.TOO_MANY_PROMPTS,
            f"'prompt' holds {prompts} prompts; send at most {settings.max_prompts} per request.",
            param="prompt",
        )
    sequences = req.n * prompts
    if sequences > settings.max_sequences:
        raise APIError(
            ErrorCode.TOO_MANY_SEQUENCES,
            f"n × prompts is {req.n} × {prompts} = {sequences} sequences; the limit is "
            f"{settings.max_sequences} per request.",
            param="n",
        )
    body = req.model_dump(exclude_none=True)
    body.pop("lorafleet", None)
    cap_max_tokens(body, tenant, sequences)
    if not req.stream:
        _check_answer_size(body, sequences, settings)
    return body, sequences


def _check_answer_size(body: dict[str, Any], sequences: int, settings: GatewaySettings) -> None:
    """A whole (non-streamed) answer is held and parsed at once: bounded in tokens and log-probabilities
    (sequences × max_tokens × (1 + top_logprobs)); a stream has no such bound."""
    if body.get("logprobs") is True:  # chat: the chosen token's log-probability, and top_logprobs more
        per_token = 2 + int(body.get("top_logprobs") or 0)
    else:  # completions: an integer count of top log-probabilities
        logprobs = body.get("logprobs")
        per_token = 2 + logprobs if isinstance(logprobs, int) and not isinstance(logprobs, bool) else 1
    tokens = completion_budget(body, settings.max_model_len)
    if body.get("echo"):  # the prompt comes back too, with its log-probabilities: up to the model's length
        tokens += settings.max_model_len
    entries = sequences * tokens * per_token
    if entries > settings.max_answer_entries:
        raise APIError(
            ErrorCode.ANSWER_TOO_LARGE,
            f"A whole answer of {sequences} sequences × {tokens} tokens × {per_token} log-probabilities "
            f"({entries}) is over the limit of {settings.max_answer_entries}: stream it ('stream': true), or ask "
            "for fewer sequences, tokens or top_logprobs.",
            param="max_tokens" if per_token == 1 else ("top_logprobs" if "top_logprobs" in body else "logprobs"),
        )


def _check_schemas(body: dict[str, Any]) -> None:
    """The client's schemas within the limits (``serving.outputs.schemas``): its ``response_format`` and its tools."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        check_client_schema((fmt.get("json_schema") or {}).get("schema"))
    if "tools" in body:
        check_tools(body["tools"])


def _user(request: Request, body: dict[str, Any], tenant: Tenant) -> str:
    """Who the request is for, for sticky canary assignment: ``user``, else the header, else the API key;
    within the tenant (two tenants' users never share a point)."""
    user = body.get("user") or request.headers.get("x-lorafleet-user")
    if isinstance(user, str) and user:
        return f"{tenant.id}:user:{user}"
    key = request.headers.get("authorization", "")
    return f"{tenant.id}:key:" + hashlib.sha256(key.encode()).hexdigest()
