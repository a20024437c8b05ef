"""The engine side of one completion request: send it, with retries, and relay the answer to the client.

``send`` delivers an ``EngineRequest`` to the engine it was routed to, and
sends it again, before any byte reached the client, on another engine when
that one fails, after reloading an adapter the engine lost, or without the
schema constraint its grammar backend cannot compile. ``full_response`` then
relays a whole answer and ``stream_response`` server-sent events, each with
the JSON verdict added and tool calls rewritten (``serving.jsoncheck``,
``serving.toolcalls``). The routes that build the request are in
``serving.routes.completions``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from contract.store import AdapterVersion
from serving.adapters import AdapterMisfit
from serving.deps import GatewayState
from serving.engine import BASE_MODEL_NAME, EngineError, EngineResponse
from serving.errors import APIError, error_body
from serving.fleet.fleet import NoEngine
from serving.jsoncheck import JsonCheck, JsonPlan
from serving.limits import Slot
from serving.metrics import RequestRecord
from serving.protocol import filter_response
from serving.sse import event_data
from serving.toolcalls import ToolPlan, ToolStream

log = logging.getLogger("lorafleet.gateway")

# What a client gets when the engine's stream breaks off after the first byte (OpenAI's error shape, then [DONE]).
BROKEN_STREAM = "engine_stream_broken"
ENGINE_STREAM_ERROR = "engine_stream_error"
STREAM_BROKEN_EVENT = (
    b'data: {"error": {"message": "The engine stopped answering mid-stream; the answer is incomplete. Retry.", '
    b'"type": "server_error", "param": null, "code": "engine_stream_broken"}}\n\ndata: [DONE]\n\n'
)
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


async def send(state: GatewayState, call: EngineRequest, record: RequestRecord, slot: Slot) -> EngineResponse:
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


async def full_response(upstream: EngineResponse, call: EngineRequest, record: RequestRecord, slot: Slot) -> Response:
    """A whole answer (or the engine's error): the JSON verdict added, tool calls rewritten."""
    try:
        content = await upstream.aread()
    except EngineError as exc:
        raise engine_unavailable() from exc
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
        return engine_unavailable()
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


def engine_unavailable() -> APIError:
    return APIError(
        503, "The engine is not reachable; retry shortly.", code="engine_unavailable", headers={"Retry-After": "5"}
    )


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
