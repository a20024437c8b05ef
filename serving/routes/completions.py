"""OpenAI-compatible completion routes: the tenant names an alias, the gateway serves its adapter."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from contract.judge import judge
from contract.manifest import AdapterManifest
from serving.adapters import AdapterMisfit
from serving.deps import GatewayState, StateDep, TenantDep
from serving.engine import EngineError
from serving.errors import APIError
from serving.tenants import Tenant

log = logging.getLogger("lorafleet.gateway")
router = APIRouter(prefix="/v1")

# Fields a client may not set: they would let a request pick the engine's prompt
# rendering or reach an adapter by path.
GATEWAY_ONLY_FIELDS = ("chat_template", "chat_template_kwargs", "lora_request", "lora_path")


class ChatCompletionRequest(BaseModel):
    """The fields the gateway itself reads; everything else goes to the engine as sent."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False


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
async def chat_completions(req: ChatCompletionRequest, tenant: TenantDep, state: StateDep) -> Response:
    """Chat completion through the alias's current adapter version (SSE when ``stream`` is true)."""
    body = req.model_dump(exclude_none=True)
    for name in GATEWAY_ONLY_FIELDS:
        if name in body:
            raise APIError(
                400, f"'{name}' is set by the gateway and cannot be sent.", param=name, code="forbidden_field"
            )
    version, manifest = await _resolve(state, tenant, req.model)
    body["model"] = version.ref
    body["chat_template"] = manifest.prompt_format.chat_template
    try:
        upstream = await state.engine.send("/v1/chat/completions", body, stream=req.stream)
    except EngineError as exc:
        raise APIError(
            503, "The engine is not reachable; retry shortly.", code="engine_unavailable", headers={"Retry-After": "5"}
        ) from exc
    headers = {"x-lorafleet-adapter": version.ref}
    if upstream.status_code != 200 or not req.stream:
        content = await upstream.aread()
        await upstream.aclose()
        schema = _expected_schema(body, manifest)
        if upstream.status_code == 200 and schema is not None:
            if _has_regex(schema) and schema is not manifest.output_schema:
                # Python's re has no time bound; a client's pattern could stall the gateway.
                headers["x-lorafleet-json"] = "unchecked"
            else:
                content, outcome = _with_json_checks(content, schema)
                headers["x-lorafleet-json"] = outcome
        return Response(content, upstream.status_code, headers=headers, media_type="application/json")
    return StreamingResponse(_relay(upstream), headers=headers, media_type="text/event-stream")


def _expected_schema(body: dict[str, Any], manifest: AdapterManifest) -> dict[str, Any] | None:
    """The schema an answer is checked against: the request's ``response_format``, else the adapter's own.

    ``{}`` (any JSON) for ``json_object``; ``None`` when no JSON is expected.
    """
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else {}
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {}
    if isinstance(fmt, dict) and fmt.get("type") == "text":
        return None
    return manifest.output_schema


def _has_regex(schema: Any) -> bool:
    if isinstance(schema, dict):
        return bool({"pattern", "patternProperties"} & schema.keys()) or any(_has_regex(v) for v in schema.values())
    if isinstance(schema, list):
        return any(_has_regex(v) for v in schema)
    return False


def _with_json_checks(content: bytes, schema: dict[str, Any]) -> tuple[bytes, str]:
    """Judge every choice with the shared judge (the evaluation's) and add the verdicts to the body."""
    data = json.loads(content)
    checks = []
    for choice in data.get("choices", []):
        verdict = judge(choice.get("message", {}).get("content") or "", schema,
                        finish_reason=choice.get("finish_reason"))  # fmt: skip
        checks.append({"index": choice.get("index", 0), "valid": verdict.outcome == "valid",
                       "outcome": verdict.outcome, "errors": verdict.errors})  # fmt: skip
    data["lorafleet"] = {"json_checks": checks}
    return json.dumps(data).encode(), checks[0]["outcome"] if checks else "none"


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_bytes():
            yield chunk
    finally:
        await upstream.aclose()


async def _resolve(state: GatewayState, tenant: Tenant, alias: str) -> tuple[Any, Any]:
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
    if not state.engine.is_ready():
        raise APIError(
            503, "The engine is starting; retry shortly.", code="engine_starting", headers={"Retry-After": "5"}
        )
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
    return version, manifest
