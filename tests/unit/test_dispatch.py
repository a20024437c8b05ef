"""Sending a request to its engine (serving/engines/dispatch.py): failover before the first byte, the schema an
engine cannot enforce, the answers it reads ahead. Fake engines behind a real ``Fleet``; no app."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from contract.basemodel import identify
from contract.store import AdapterStore
from serving.engines.adapters import AdapterRegistry
from serving.engines.dispatch import EngineRequest, PeekedStream, ReadResponse, Target, send, unimplemented
from serving.engines.fleet import Fleet
from serving.engines.protocol import BASE_MODEL_NAME, EngineTimeout
from serving.metrics import GatewayMetrics
from serving.outputs.jsoncheck import JsonPlan
from serving.outputs.modes import AliasPolicy
from serving.records import RequestRecord
from serving.state.limits import TenantLimiter
from serving.state.tenants import Tenant
from tests.fakes import FakeEngine, fake_base

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "not": {"required": ["b"]}}
UNIMPLEMENTED = 'Unimplemented keys: ["not"]'


def fleet_of(tmp_path: Path, **engines: FakeEngine) -> Fleet:
    registry = AdapterRegistry(AdapterStore(tmp_path / "adapters"), dict(engines), identify(fake_base(tmp_path)), 64)
    return Fleet(dict(engines), registry, dict.fromkeys(engines, 4))


def base_request(engine: str, *, enforce: bool = False, stream: bool = False) -> EngineRequest:
    body = {"model": BASE_MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if enforce:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    plan = JsonPlan.for_request(body, None, AliasPolicy())
    target = Target("base", BASE_MODEL_NAME, None, "stable", None, None, None, None, engine)
    return EngineRequest("/v1/chat/completions", body, stream, target, plan, None, wants_usage=False)


def slot() -> object:
    return TenantLimiter().admit(Tenant(1, "acme", frozenset({"base"})), 1)


def go(fleet: Fleet, metrics: GatewayMetrics, call: EngineRequest) -> tuple[int, bytes, RequestRecord]:
    record = RequestRecord("r1", "POST", "/v1/chat/completions")

    async def run() -> tuple[int, bytes]:
        answer = await send(fleet, metrics, call, record, slot())  # type: ignore[arg-type]
        try:
            return answer.status_code, await answer.aread()
        finally:
            await answer.aclose()

    status, content = asyncio.run(run())
    return status, content, record


def failovers(metrics: GatewayMetrics, engine: str) -> float:
    return metrics.failovers.labels(engine)._value.get()


def test_an_unreachable_engine_is_passed_over_before_the_first_byte(tmp_path: Path) -> None:
    dead, alive = FakeEngine(), FakeEngine()
    dead.unreachable = True
    fleet, metrics = fleet_of(tmp_path, a=dead, b=alive), GatewayMetrics()
    call = base_request("a")
    status, content, record = go(fleet, metrics, call)
    assert status == 200 and json.loads(content)["choices"][0]["message"]["content"] == '{"a": 1}'
    assert call.target.engine == "b" and call.body["model"] == BASE_MODEL_NAME
    assert "a" in fleet.down and failovers(metrics, "a") == 1
    assert alive.request_ids == [record.engine_request_id] and record.engine_request_id.endswith("-r1")


class SlowToAnswer(FakeEngine):
    """Takes the request (it is written) and does not answer within the gateway's timeout."""

    async def send(self, path: str, body: dict, *, stream: bool, request_id=None, on_sent=None):  # type: ignore[no-untyped-def]
        self.requests.append(body)
        if on_sent is not None:
            on_sent()
        raise EngineTimeout("the engine did not answer in time")


def test_a_request_the_engine_took_and_did_not_answer_in_time_is_not_run_twice(tmp_path: Path) -> None:
    slow, other = SlowToAnswer(), FakeEngine()
    fleet, metrics = fleet_of(tmp_path, a=slow, b=other), GatewayMetrics()
    with pytest.raises(EngineTimeout):
        go(fleet, metrics, base_request("a"))
    assert len(slow.requests) == 1 and other.requests == []  # not sent again elsewhere
    assert "a" not in fleet.down and failovers(metrics, "a") == 0  # busy, not down


def test_a_503_with_nowhere_else_to_go_is_returned_as_read(tmp_path: Path) -> None:
    busy = FakeEngine()
    busy.refuse = lambda body: httpx.Response(503, json={"error": {"message": "overloaded"}})
    status, content, _ = go(fleet_of(tmp_path, a=busy), GatewayMetrics(), base_request("a"))
    assert status == 503 and b"overloaded" in content and len(busy.requests) == 1


def test_a_schema_the_engine_cannot_compile_is_sent_again_unconstrained(tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.refuse = lambda body: (
        httpx.Response(400, json={"error": {"message": UNIMPLEMENTED}}) if "response_format" in body else None
    )
    call = base_request("a", enforce=True)
    status, _, _ = go(fleet_of(tmp_path, a=engine), GatewayMetrics(), call)
    assert status == 200 and len(engine.requests) == 2 and "response_format" not in engine.requests[1]
    assert (call.plan.mode, call.plan.unenforced) == ("validate", ("not",))


def test_a_streams_first_event_is_read_ahead_for_a_schema_error(tmp_path: Path) -> None:
    """vLLM reports a schema it cannot compile inside a 200 stream: looked at before the client sees a byte."""
    engine = FakeEngine()
    error_event = b"data: " + json.dumps({"error": {"message": UNIMPLEMENTED}}).encode() + b"\n\n"
    engine.refuse = lambda body: (
        httpx.Response(200, content=error_event, headers={"content-type": "text/event-stream"})
        if "response_format" in body
        else None
    )
    call = base_request("a", enforce=True, stream=True)
    status, content, _ = go(fleet_of(tmp_path, a=engine), GatewayMetrics(), call)
    assert status == 200 and content.endswith(b"data: [DONE]\n\n") and b"error" not in content
    assert call.plan.mode == "validate" and len(engine.requests) == 2


def test_an_engine_refusal_is_handed_back_once(tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.refuse = lambda body: httpx.Response(400, json={"error": {"message": "prompt too long"}})
    status, content, _ = go(fleet_of(tmp_path, a=engine), GatewayMetrics(), base_request("a", enforce=True))
    assert status == 400 and b"prompt too long" in content and len(engine.requests) == 1


@pytest.mark.parametrize(
    ("content", "keywords"),
    [
        (b'{"error": {"message": "Unimplemented keys: [\\"not\\", \\"if\\"]"}}', ("not", "if")),
        (b"unimplemented key: ['x']", ()),
        (b"unimplemented keys: []", ()),
        (b"something else", ()),
    ],
)
def test_the_keywords_vllm_cannot_enforce_are_read_from_its_message(content: bytes, keywords: tuple) -> None:
    assert unimplemented(content) == keywords


def test_read_ahead_and_read_whole_answers_replay_every_byte() -> None:
    async def run() -> tuple[bytes, bytes, list[bytes]]:
        upstream = httpx.Response(200, content=b"one two three")
        peeked = await PeekedStream.of(upstream)  # type: ignore[arg-type]
        whole = ReadResponse(200, b"whole")
        return await peeked.aread(), await whole.aread(), [c async for c in whole.aiter_bytes()]

    peeked, whole, chunks = asyncio.run(run())
    assert (peeked, whole, chunks) == (b"one two three", b"whole", [b"whole"])
