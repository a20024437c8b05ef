"""The engine side of one completion request: send it to its engine, again where that fails.

``send`` delivers an ``EngineRequest`` (built by ``serving.plan``) to the
engine it was routed to, and sends it again, before any byte reached the
client, on another engine when that one fails, after reloading an adapter the
engine lost, or without the schema constraint its grammar backend cannot
compile. What comes back is relayed to the client by ``serving.http.relay``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from contract.store import AdapterVersion
from serving.engines.adapters import AdapterMisfit
from serving.engines.fleet import Fleet, NoEngine
from serving.engines.protocol import BASE_MODEL_NAME, EngineError, EngineResponse, EngineTimeout
from serving.metrics import GatewayMetrics
from serving.outputs.jsoncheck import JsonPlan
from serving.outputs.toolcalls import ToolPlan
from serving.records import RequestRecord
from serving.state.limits import Slot

log = logging.getLogger("lorafleet.gateway")

# vLLM's error for a schema its grammar backend cannot compile ("Unimplemented keys: [\"not\"]").
UNIMPLEMENTED = re.compile(r"[Uu]nimplemented keys?:?\s*(\[[^\]]*\])")


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
    engine: str  # the engine it was routed to (serving.engines)


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
        # Which arm of a canary served is not the client's to know (it could aim at one): the access log and the
        # metrics carry it (``variant``).
        headers = {"x-lorafleet-adapter": self.target.engine_model, "x-lorafleet-json-mode": self.plan.mode}
        if self.plan.unenforced:
            headers["x-lorafleet-json-unenforced"] = ",".join(self.plan.unenforced)
        return headers


async def send(
    fleet: Fleet, metrics: GatewayMetrics, call: EngineRequest, record: RequestRecord, slot: Slot
) -> EngineResponse:
    """Send ``call`` to its engine, and again, before any byte reached the client, when

    - the engine cannot be reached, or answers 502/503: once, on another engine (``serving.engines``), the failed
      one out of routing until its health check passes; never for a request the engine took and did not answer
      in time (it may still be running there: ``EngineTimeout``);
    - it does not have the adapter (it restarted, or a retirement raced this request): reloaded, then sent again;
    - it cannot enforce the schema (a keyword its grammar backend lacks, such as ``not``): sent without the
      constraint, the answer checked in validate mode and flagged (``unenforced_keywords``).
    """
    retried: set[str] = set()
    while True:
        record.engine_request_id = f"gw{secrets.token_hex(6)}-{record.request_id}"  # the gateway's own, unique
        record.upstream_sent = None  # set once this attempt's request is written to the engine
        engine = fleet.members.get(call.target.engine)
        try:
            if engine is None:  # removed (discovery) since the request was routed
                raise EngineError(f"engine {call.target.engine} is gone")
            upstream = await engine.send(
                call.route, call.body, stream=call.stream, request_id=record.engine_request_id, on_sent=record.mark_sent
            )
        except EngineError as exc:
            # A request the engine took and did not answer in time may still be running there: sent again
            # elsewhere it would run twice, and the engine is busy, not down.
            accepted = isinstance(exc, EngineTimeout) and record.upstream_sent is not None
            if accepted or "failover" in retried or not await _fail_over(fleet, metrics, call, slot):
                raise
            retried.add("failover")
            continue
        if upstream.status_code in (502, 503) and "failover" not in retried:
            content = await _read_whole(upstream)
            if await _fail_over(fleet, metrics, call, slot):
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
            await fleet.registry.reload(version, call.target.engine)
            retried.add("reload")
            continue
        keywords = unimplemented(content) if upstream.status_code == 400 and call.plan.mode == "enforce" else ()
        if keywords and "schema" not in retried:
            call.plan = call.plan.validate_instead(call.body, keywords)
            retried.add("schema")
            continue
        return ReadResponse(upstream.status_code, content)


async def _fail_over(fleet: Fleet, metrics: GatewayMetrics, call: EngineRequest, slot: Slot) -> bool:
    """Move ``call`` to another engine (its adapter loaded there); ``False`` when there is none."""
    failed = call.target.engine
    fleet.mark_down(failed)
    version = call.target.version
    if version is None:
        chosen = fleet.pick(None, exclude={failed})
        if chosen is None:
            return False
        engine, model = chosen.engine, BASE_MODEL_NAME
    else:
        try:
            placed = await fleet.place(version, exclude={failed})
        except (NoEngine, EngineError, AdapterMisfit):
            return False
        call.lease()  # its count moves to the new engine
        call.lease = placed.release
        slot.on_release(placed.release)
        engine, model = placed.engine, placed.engine_model
    log.warning("engine %s failed a request before its first byte: retrying it on %s", failed, engine)
    call.target = dataclasses.replace(call.target, engine=engine, engine_model=model)
    call.body["model"] = model
    metrics.failovers.labels(failed).inc()
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
