"""The answer of one completion request, relayed to the client: whole, or as server-sent events.

``full_response`` relays a whole answer and ``stream_response`` server-sent
events, each with the JSON verdict added (``serving.outputs.jsoncheck``) and
tool calls rewritten (``serving.outputs.toolcalls``), and the engine's own
errors in the gateway's shape. Whatever way the response ends (the last
event, an engine that breaks off, a client that hangs up), the engine
connection is closed and the request's slot and adapter lease are released.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.engines.dispatch import EngineRequest
from serving.engines.protocol import EngineError, EngineResponse, EngineTimeout
from serving.errors import APIError, ErrorCode, error_body
from serving.http.protocol import filter_response
from serving.http.sse import event_data
from serving.outputs.jsoncheck import JsonCheck
from serving.outputs.toolcalls import ToolStream
from serving.records import RequestRecord
from serving.state.limits import Slot

log = logging.getLogger("lorafleet.gateway")

# What a client gets when the engine's stream breaks off after the first byte (OpenAI's error shape, then [DONE]).
STREAM_BROKEN_EVENT = (
    b"data: "
    + json.dumps(
        error_body(
            ErrorCode.ENGINE_STREAM_BROKEN.status,
            "The engine stopped answering mid-stream; the answer is incomplete. Retry.",
            ErrorCode.ENGINE_STREAM_BROKEN,
        )
    ).encode()
    + b"\n\ndata: [DONE]\n\n"
)
# The access log's error_code for a stream that carried vLLM's own error event (relayed in the gateway's words).
ENGINE_STREAM_ERROR = "engine_stream_error"


async def full_response(upstream: EngineResponse, call: EngineRequest, record: RequestRecord, slot: Slot) -> Response:
    """A whole answer (or the engine's error): the JSON verdict added, tool calls rewritten."""
    try:
        content = await upstream.aread()
    except EngineError as exc:
        raise engine_failed(exc) from exc
    finally:
        await upstream.aclose()
        slot.release()
    headers = call.headers()
    if upstream.status_code != 200:
        raise _engine_refused(upstream.status_code, content, record)
    check = call.plan.check()
    # Parsed here, on the event loop (a thread would not help: the parse holds the GIL): what bounds its time is
    # the bound on a whole answer's size (serving.http.routes.completions, LORAFLEET_MAX_ANSWER_ENTRIES).
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
        return APIError(
            ErrorCode.ENGINE_ERROR,
            "The engine failed on this request; retry, or report it with the x-request-id header.",
        )
    return APIError(ErrorCode.ENGINE_REJECTED, message, status=status if 400 <= status < 500 else 502)


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
        return error_body(code, str(error.get("message", "The engine refused the request.")), ErrorCode.ENGINE_REJECTED)
    log.error("engine stream error: %s", error)
    return error_body(
        502,
        "The engine failed on this request; the answer is incomplete. Retry, or report it with "
        "the x-request-id header.",
        ErrorCode.ENGINE_ERROR,
    )


def engine_failed(exc: EngineError) -> APIError:
    """The client's answer when the engine failed before answering: 504 when it took too long, else 503."""
    if isinstance(exc, EngineTimeout):
        return APIError(ErrorCode.ENGINE_TIMEOUT, "The engine did not answer in time; the request may be too long.")
    return engine_unavailable()


def engine_unavailable() -> APIError:
    return APIError(
        ErrorCode.ENGINE_UNAVAILABLE, "The engine is not reachable; retry shortly.", headers={"Retry-After": "5"}
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
                    # Every event is parsed and relayed with OpenAI's fields only (``serving.http.protocol``).
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
            record.error_code = ErrorCode.ENGINE_STREAM_BROKEN.value
            yield STREAM_BROKEN_EVENT
            return
        if pending:
            yield pending
    finally:
        record.finished = time.perf_counter()
        await close()
