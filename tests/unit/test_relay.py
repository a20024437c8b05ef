"""Relaying an engine's answer to the client (serving/http/relay.py): whole or streamed, the JSON verdict added,
the engine's errors in the gateway's words, and the slot released however the answer ends. No app, no engine:
the engine's answer is a plain ``EngineResponse``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serving.engines.dispatch import EngineRequest, ReadResponse, Target
from serving.engines.protocol import EngineError, EngineTimeout
from serving.errors import APIError, ErrorCode
from serving.http.relay import STREAM_BROKEN_EVENT, full_response, stream_response
from serving.outputs.jsoncheck import JsonPlan
from serving.outputs.modes import AliasPolicy
from serving.records import RequestRecord
from serving.state.limits import Slot, TenantLimiter
from serving.state.tenants import Tenant

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TENANT = Tenant(1, "acme", frozenset({"orders"}))


class Streamed:
    """An engine's streamed answer: these chunks, then (optionally) a broken connection."""

    def __init__(self, chunks: list[bytes], breaks: bool = False) -> None:
        self.status_code, self.chunks, self.breaks, self.closed = 200, chunks, breaks, False

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.breaks:
            raise EngineError("connection reset")

    async def aread(self) -> bytes:
        return b"".join(self.chunks)

    async def aclose(self) -> None:
        self.closed = True


def call(*, stream: bool = False, wants_usage: bool = False) -> EngineRequest:
    body: dict[str, Any] = {"model": "orders@1", "messages": [{"role": "user", "content": "hi"}]}
    plan = JsonPlan.for_request(body, SCHEMA, AliasPolicy())
    target = Target("orders", "orders@1", None, "stable", None, None, SCHEMA, None, "engine")
    return EngineRequest("/v1/chat/completions", body, stream, target, plan, None, wants_usage)


def admitted() -> tuple[TenantLimiter, Slot]:
    limiter = TenantLimiter()
    return limiter, limiter.admit(TENANT, 1)


def event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def chunk(content: str | None, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish, "token_ids": [1]}
    return event({"id": "c", "object": "chat.completion.chunk", "model": "orders@1", "choices": [choice]})


USAGE = event({"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})


def relayed(response: Any) -> list[bytes]:
    async def run() -> list[bytes]:
        return [part async for part in response.body_iterator]

    return b"".join(asyncio.run(run())).split(b"\n\n")[:-1]


def test_a_whole_answer_gets_its_verdict_and_loses_the_engines_fields() -> None:
    limiter, slot = admitted()
    answer = {
        "id": "c1",
        "object": "chat.completion",
        "model": "orders@1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": '{"a": 1}'}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        "kv_transfer_params": None,
        "prompt_token_ids": [7],
    }
    record = RequestRecord("r", "POST", "/v1/chat/completions")
    response = asyncio.run(full_response(ReadResponse(200, json.dumps(answer).encode()), call(), record, slot))
    data = json.loads(bytes(response.body))
    assert data["lorafleet"]["json_checks"][0]["outcome"] == "valid" and response.headers["x-lorafleet-json"] == "valid"
    assert "kv_transfer_params" not in data and "prompt_token_ids" not in data
    assert (record.prompt_tokens, record.completion_tokens, record.json_outcomes) == (5, 3, ["valid"])
    assert limiter.in_flight(TENANT) == 0


@pytest.mark.parametrize(
    ("status", "body", "code", "client_status"),
    [
        (400, {"error": {"message": "This model's maximum context length is 8192 tokens."}}, "engine_rejected", 400),
        (500, {"error": {"message": "CUDA error: internal detail"}}, "engine_error", 502),
        (503, {"error": {"message": "overloaded"}}, "engine_unavailable", 503),
    ],
)
def test_the_engines_errors_leave_in_the_gateways_words(
    status: int, body: dict[str, Any], code: str, client_status: int
) -> None:
    limiter, slot = admitted()
    record = RequestRecord("r", "POST", "/v1/chat/completions")
    with pytest.raises(APIError) as refused:
        asyncio.run(full_response(ReadResponse(status, json.dumps(body).encode()), call(), record, slot))
    assert (refused.value.code, refused.value.status) == (ErrorCode(code), client_status)
    if status == 500:
        assert "internal detail" not in refused.value.message  # the engine's own failure stays in the log
    if status == 503:
        assert refused.value.headers["Retry-After"] == "5"  # overloaded or starting: the client may retry
    if status == 400:
        assert refused.value.message == body["error"]["message"]  # a refusal keeps vLLM's words
    assert limiter.in_flight(TENANT) == 0


def test_an_answer_that_does_not_come_in_time_is_504_not_503() -> None:
    class Late(Streamed):
        async def aread(self) -> bytes:
            raise EngineTimeout("no answer in time")

    limiter, slot = admitted()
    with pytest.raises(APIError) as refused:
        asyncio.run(full_response(Late([]), call(), RequestRecord("r", "POST", "/"), slot))  # type: ignore[arg-type]
    assert (refused.value.code, refused.value.status) == (ErrorCode.ENGINE_TIMEOUT, 504)
    assert limiter.in_flight(TENANT) == 0


def test_a_stream_is_relayed_event_by_event_with_its_verdict_last() -> None:
    limiter, slot = admitted()
    upstream = Streamed([chunk('{"a"'), chunk(": 1}", "stop") + USAGE, b"data: [DONE]\n\n"])
    record = RequestRecord("r", "POST", "/v1/chat/completions")
    events = relayed(stream_response(upstream, call(stream=True), record, slot))  # type: ignore[arg-type]
    assert events[-1] == b"data: [DONE]"
    verdict = json.loads(events[-2][len(b"data: ") :])
    assert verdict["object"] == "lorafleet.json_check" and verdict["lorafleet"]["outcome"] == "valid"
    assert not any(b"usage" in e for e in events)  # the client did not ask for it; the metrics got it
    assert not any(b"token_ids" in e for e in events)  # vLLM's own fields stay behind
    assert record.completion_tokens == 2 and record.first_token is not None and record.finished is not None
    assert upstream.closed and limiter.in_flight(TENANT) == 0


def test_a_stream_that_breaks_off_ends_with_an_error_event_and_done() -> None:
    limiter, slot = admitted()
    upstream = Streamed([chunk('{"a"')], breaks=True)
    record = RequestRecord("r", "POST", "/v1/chat/completions")
    events = relayed(stream_response(upstream, call(stream=True), record, slot))  # type: ignore[arg-type]
    assert (
        b"\n\n".join(events[-2:]) + b"\n\n"
        == STREAM_BROKEN_EVENT
        == (
            b'data: {"error": {"message": "The engine stopped answering mid-stream; the answer is incomplete. Retry.", '
            b'"type": "server_error", "param": null, "code": "engine_stream_broken"}}\n\ndata: [DONE]\n\n'
        )
    )  # what clients have parsed all along
    assert json.loads(events[-2][len(b"data: ") :])["error"]["code"] == "engine_stream_broken"
    assert record.error_code == "engine_stream_broken" and upstream.closed and limiter.in_flight(TENANT) == 0


def test_an_error_event_of_the_engines_is_reworded() -> None:
    _, slot = admitted()
    failure = event({"error": {"message": "Traceback: internal detail", "code": 500}})
    refusal = event({"error": {"message": "bad sampling parameter", "code": 400}})
    upstream = Streamed([refusal, failure, b"data: [DONE]\n\n"])
    record = RequestRecord("r", "POST", "/v1/chat/completions")
    events = relayed(stream_response(upstream, call(stream=True), record, slot))  # type: ignore[arg-type]
    errors = [json.loads(e[len(b"data: ") :])["error"] for e in events if b'"error"' in e]
    assert [(e["code"], e["type"]) for e in errors] == [
        ("engine_rejected", "invalid_request_error"),
        ("engine_error", "server_error"),
    ]
    assert errors[0]["message"] == "bad sampling parameter" and "internal detail" not in errors[1]["message"]
    assert record.error_code == "engine_stream_error"


def test_a_stream_the_client_leaves_still_releases_everything() -> None:
    """Closing the relay early (the client hung up) closes the engine's answer and frees the slot."""
    limiter, slot = admitted()
    upstream = Streamed([chunk('{"a"'), chunk(": 1}", "stop"), b"data: [DONE]\n\n"])
    record = RequestRecord("r", "POST", "/v1/chat/completions")
    response = stream_response(upstream, call(stream=True), record, slot)  # type: ignore[arg-type]

    async def leave_after_one() -> None:
        body = response.body_iterator
        await anext(body)  # type: ignore[call-overload]
        await body.aclose()  # type: ignore[attr-defined]

    asyncio.run(leave_after_one())
    assert upstream.closed and limiter.in_flight(TENANT) == 0
