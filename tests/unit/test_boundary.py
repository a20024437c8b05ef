"""The tenant boundary against a fake engine: only allowlisted fields in and out, every request bounded,
the engine's refusals handled, hot-swap safe in every order.

The same cases against the real vLLM engine are in test_bad_input_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from contract.basemodel import identify
from contract.store import AdapterStore
from serving.app import build_app
from serving.config import GatewaySettings
from serving.engines.adapters import AdapterRegistry
from serving.http.protocol import ChatRequest
from serving.state.tenants import Limits, TenantStore
from tests.conftest import make_adapter
from tests.fakes import ADMIN_KEY, FakeEngine, assert_openai_error, chat, fake_base

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[tuple[TestClient, FakeEngine, dict[str, str], TenantStore]]:
    settings = GatewaySettings(
        data_dir=tmp_path, base_model=str(fake_base(tmp_path)), admin_key=ADMIN_KEY, state_cache_s=0
    )
    store = AdapterStore(settings.adapters_dir)
    store.publish(make_adapter(tmp_path / "src-orders"), "orders")
    tenants = TenantStore(settings.state_url)
    acme, tight = tenants.create("acme"), tenants.create("tight")
    tenants.grant(acme, "orders")
    tenants.grant(tight, "orders")
    tenants.set_limits("tight", Limits(requests_per_minute=10, max_concurrent=4, max_tokens=100))
    keys = {"acme": tenants.issue_key(acme), "tight": tenants.issue_key(tight)}
    engine = FakeEngine()
    with TestClient(build_app(settings, engine=engine)) as client:
        yield client, engine, keys, tenants


def complete(client: TestClient, key: str, **body: object) -> httpx.Response:
    payload = {"model": "orders", "prompt": "hi"} | body
    return client.post("/v1/completions", json=payload, headers={"Authorization": f"Bearer {key}"})


# -- requests: an allowlist ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "instead"),
    [
        ("structured_outputs", {"regex": "[0-9]{5}"}, "response_format"),
        ("guided_json", {"type": "object"}, "response_format"),
        ("guided_regex", "[0-9]+", "response_format"),
        ("guided_grammar", "root ::= 'a'", "response_format"),
        ("guided_choice", ["a", "b"], "enum"),
        ("vllm_xargs", {"x": 1}, None),
        ("kv_transfer_params", {"do_remote_decode": True}, None),
        ("priority", -100, None),
        ("logits_processors", ["x"], None),
        ("return_tokens_as_token_ids", True, None),
        ("return_token_ids", True, None),
        ("chat_template", "{{ evil }}", "template"),
        ("chat_template_kwargs", {"x": 1}, "template"),
        ("cache_salt", "guess", None),
        ("lora_request", {"lora_path": "/etc"}, "model"),
        ("functions", [{"name": "f"}], "tools"),
        ("best_of", 4, "'n'"),
    ],
)
def test_a_field_outside_the_allowlist_is_refused_by_name(gw, field: str, value: object, instead: str | None) -> None:
    client, engine, keys, _ = gw
    sent = len(engine.requests)
    error = assert_openai_error(chat(client, keys["acme"], **{field: value}), 400, "unsupported_parameter")
    assert error["param"] == field and f"'{field}'" in error["message"]
    if instead:
        assert instead in error["message"]
    assert len(engine.requests) == sent  # nothing reached the engine


def test_unknown_fields_are_found_inside_messages_and_on_the_text_route_too(gw) -> None:
    client, engine, keys, _ = gw
    inner = chat(client, keys["acme"], messages=[{"role": "user", "content": "hi", "prompt_token_ids": [1]}])
    assert assert_openai_error(inner, 400, "unsupported_parameter")["param"] == "messages.0.prompt_token_ids"
    error = assert_openai_error(complete(client, keys["acme"], messages=[]), 400, "unsupported_parameter")
    assert error["param"] == "messages" and "/v1/chat/completions" in error["message"]
    assert not engine.requests or all("prompt_token_ids" not in r for r in engine.requests)
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]  # a text model takes text parts only
    error = assert_openai_error(chat(client, keys["acme"], messages=[{"role": "user", "content": image}]), 400)
    assert error["code"] == "unsupported_parameter" and "read text only" in error["message"]


def test_the_engine_gets_only_typed_fields_and_what_the_gateway_sets(gw) -> None:
    client, engine, keys, _ = gw
    extras = {
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "seed": 7,
        "stop_token_ids": [2],
        "min_tokens": 1,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "user": "u-1",
        "logit_bias": {"42": -100},
        "logprobs": True,
        "top_logprobs": 2,
    }
    assert chat(client, keys["acme"], **extras).status_code == 200
    body = engine.requests[-1]
    assert {k: body[k] for k in extras} == extras
    allowed = set(ChatRequest.model_fields) - {"lorafleet"}
    gateway_sets = {"chat_template", "cache_salt", "response_format", "stream_options"}
    assert set(body) <= allowed | gateway_sets, set(body) - allowed - gateway_sets


@pytest.mark.parametrize(
    "body",
    [
        {"temperature": 3},
        {"top_p": 0},
        {"top_logprobs": 21},
        {"n": 17},
        {"stop": ["a"] * 9},
        {"logit_bias": {"x": 1}},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "guided": 1}}},
        {"response_format": {"type": "regex"}},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    ],
)
def test_out_of_range_values_are_refused_before_the_engine(gw, body: dict) -> None:
    client, engine, keys, _ = gw
    sent = len(engine.requests)
    resp = chat(client, keys["acme"], **body)
    assert resp.status_code in (400, 422), resp.text
    assert_openai_error(resp, resp.status_code)
    assert len(engine.requests) == sent


# -- responses: an allowlist too ----------------------------------------------------------------------------------

ENGINE_INTERNALS = (
    "system_fingerprint",
    "prompt_token_ids",
    "kv_transfer_params",
    "token_ids",
    "stop_reason",
    "routed_experts",
    "reasoning",
    "prompt_tokens_details",
    "vllm",
)


@pytest.mark.parametrize("stream", [False, True])
def test_answers_carry_no_engine_internals(gw, stream: bool) -> None:
    client, _, keys, _ = gw
    chat_answer = chat(client, keys["acme"], stream=stream, stream_options={"include_usage": True} if stream else None)
    text_answer = complete(client, keys["acme"], stream=stream)
    for resp in (chat_answer, text_answer):
        assert resp.status_code == 200, resp.text
        for internal in ENGINE_INTERNALS:
            assert internal not in resp.text, (internal, resp.text)
    if not stream:
        data = chat_answer.json()
        assert set(data) <= {"id", "object", "created", "model", "choices", "usage", "lorafleet"}
        assert data["choices"][0]["message"]["content"] and data["usage"]["total_tokens"] == 8
    else:
        events = [e for e in chat_answer.text.split("\n\n") if e.strip()]
        assert events[-1] == "data: [DONE]" and any('"usage"' in e for e in events)


# -- bounds on what one request makes the engine do ---------------------------------------------------------------


def test_list_prompts_and_sequences_are_capped(gw) -> None:
    client, engine, keys, _ = gw
    sent = len(engine.requests)
    many = assert_openai_error(complete(client, keys["acme"], prompt=["p"] * 17), 400, "too_many_prompts")
    assert many["param"] == "prompt" and "16" in many["message"]
    spread = assert_openai_error(complete(client, keys["acme"], prompt=["p"] * 4, n=8), 400, "too_many_sequences")
    assert "4 × 8" in spread["message"] or "8 × 4" in spread["message"]
    assert len(engine.requests) == sent
    assert complete(client, keys["acme"], prompt=["p"] * 16).status_code == 200


def test_the_token_budget_covers_every_sequence(gw) -> None:
    client, engine, keys, _ = gw
    over = assert_openai_error(chat(client, keys["tight"], n=4, max_tokens=50), 400, "max_tokens_over_limit")
    assert "200" in over["message"] and "100" in over["message"]
    assert chat(client, keys["tight"], n=4).status_code == 200
    assert engine.requests[-1]["max_tokens"] == 25  # the budget shared among the sequences
    assert chat(client, keys["tight"], n=2, max_tokens=50).status_code == 200


def test_limits_count_sequences_not_requests(gw) -> None:
    client, _, keys, _ = gw
    assert_openai_error(chat(client, keys["tight"], n=5, max_tokens=1), 400, "sequences_over_limit")  # > 4 at once
    assert chat(client, keys["tight"], n=4, max_tokens=1).status_code == 200  # 4 of 10 per minute
    assert chat(client, keys["tight"], n=4, max_tokens=1).status_code == 200  # 8
    limited = chat(client, keys["tight"], n=4, max_tokens=1)  # 12 > 10
    assert_openai_error(limited, 429, "rate_limit_exceeded")
    assert int(limited.headers["retry-after"]) >= 1
    assert chat(client, keys["tight"], n=2, max_tokens=1).status_code == 200  # exactly 10


def _tool(name: str, filler: int) -> dict:
    props = {f"p{i}": {"type": "string", "description": "x" * 60} for i in range(filler)}
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props}}}


def test_tools_are_capped_in_number_and_their_combined_schema_is_bounded(gw) -> None:
    client, engine, keys, _ = gw
    sent = len(engine.requests)
    too_many = chat(client, keys["acme"], tools=[_tool(f"f{i}", 1) for i in range(129)])
    assert assert_openai_error(too_many, 422, "invalid_field")["param"] == "tools"
    # each tool's parameters are well under 64 KiB; the call schema of them all (what the engine compiles) is not
    combined = chat(client, keys["acme"], tools=[_tool(f"f{i}", 9) for i in range(120)])
    error = assert_openai_error(combined, 400, "schema_refused")
    assert error["param"] == "tools" and "bytes" in error["message"]
    assert len(engine.requests) == sent


# -- the engine's answers the gateway acts on ---------------------------------------------------------------------


def test_an_adapter_the_engine_lost_is_reloaded_and_the_request_retried(gw) -> None:
    client, engine, keys, _ = gw
    assert chat(client, keys["acme"]).status_code == 200
    engine.loaded.clear()  # vLLM restarted behind the gateway's back: runtime-loaded adapters are gone
    resp = chat(client, keys["acme"], stream=True)
    assert resp.status_code == 200 and resp.text.rstrip().endswith("data: [DONE]")
    assert engine.loaded == ["orders@1"]
    assert len(set(engine.request_ids[-2:])) == 2  # each attempt is its own engine request


def test_a_schema_keyword_the_engine_cannot_enforce_is_served_in_validate_mode(gw) -> None:
    client, engine, keys, _ = gw

    def grammar_error(body: dict) -> httpx.Response | None:
        if '"not"' in json.dumps(body.get("response_format") or {}):
            message = 'Grammar error: Unimplemented keys: ["not"]'
            return httpx.Response(400, json={"error": {"message": message, "type": "BadRequestError", "code": 400}})
        return None

    engine.refuse = grammar_error
    schema = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    resp = chat(client, keys["acme"], response_format=fmt)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-lorafleet-json-mode"] == "validate"
    assert resp.headers["x-lorafleet-json-unenforced"] == "not"
    verdict = resp.json()["lorafleet"]
    assert verdict["unenforced_keywords"] == ["not"] and verdict["outcome"] == "valid"  # {"a": 1} passes "not"
    assert "response_format" not in engine.requests[-1]  # sent again without the constraint


def test_a_stream_whose_schema_the_engine_cannot_enforce_is_served_in_validate_mode(gw) -> None:
    client, engine, keys, _ = gw

    def grammar_error_event(body: dict) -> httpx.Response | None:
        # vLLM reports it inside a 200 stream, as the first event
        if body.get("stream") and '"uniqueItems"' in json.dumps(body.get("response_format") or {}):
            error = {
                "error": {
                    "message": 'Grammar error: Unimplemented keys: ["uniqueItems"]',
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            }
            sse = f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n"
            return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})
        return None

    engine.refuse = grammar_error_event
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    resp = chat(client, keys["acme"], response_format=fmt, stream=True)
    assert resp.status_code == 200 and resp.headers["x-lorafleet-json-unenforced"] == "uniqueItems"
    assert '"error"' not in resp.text and '"unenforced_keywords": ["uniqueItems"]' in resp.text
    assert resp.text.rstrip().endswith("data: [DONE]")


def test_an_error_event_of_the_engines_comes_in_the_gateways_shape(gw) -> None:
    client, engine, keys, _ = gw
    failure = {"error": {"message": "CUDA out of memory in vllm/worker.py", "type": "InternalServerError", "code": 500}}
    engine.refuse = lambda body: httpx.Response(
        200,
        content=f"data: {json.dumps(failure)}\n\ndata: [DONE]\n\n".encode(),
        headers={"content-type": "text/event-stream"},
    )
    resp = chat(client, keys["acme"], stream=True)
    events = [json.loads(e[6:]) for e in resp.text.split("\n\n") if e.startswith("data: {")]
    error = events[0]["error"]
    assert error["code"] == "engine_error" and error["type"] == "server_error" and "vllm" not in error["message"]
    assert resp.text.rstrip().endswith("data: [DONE]")


def test_an_engine_refusal_comes_back_in_the_gateways_shape(gw) -> None:
    client, engine, keys, _ = gw
    too_long = "This model's maximum context length is 2048 tokens. However, you requested 5000 tokens."
    engine.refuse = lambda body: httpx.Response(
        400, json={"object": "error", "message": too_long, "type": "BadRequestError", "param": None, "code": 400}
    )
    error = assert_openai_error(chat(client, keys["acme"]), 400, "engine_rejected")
    assert error["type"] == "invalid_request_error" and "maximum context length" in error["message"]
    engine.refuse = lambda body: httpx.Response(500, text="Traceback (most recent call last): ... vllm 0.32.0")
    failed = assert_openai_error(chat(client, keys["acme"]), 502, "engine_error")
    assert "vllm" not in failed["message"].lower() and "Traceback" not in failed["message"]


# -- hot-swap: a drain never unloads what serves again ------------------------------------------------------------


def test_promoting_a_draining_version_back_cancels_its_drain(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = AdapterStore(tmp_path / "adapters")
        v1 = store.publish(make_adapter(tmp_path / "a1"), "orders")
        v2 = store.publish(make_adapter(tmp_path / "a2"), "orders")
        store.promote("orders", 1, force=True)
        engine = FakeEngine()
        registry = AdapterRegistry(store, engine, identify(fake_base(tmp_path)), 64)
        await registry.ensure_loaded(v1)
        release = registry.lease(v1)  # a request in flight on v1
        store.promote("orders", 2, force=True)
        store.retire("orders", 1)
        await registry.retire(v1)  # draining: it waits for that request
        assert "orders@1" in engine.loaded
        store.promote("orders", 1, force=True)  # the everyday manual rollback, while the request still runs
        await registry.ensure_loaded(v1)
        release()
        await asyncio.sleep(0.05)  # the drain's unload task runs
        assert "orders@1" in engine.loaded and "orders@1" in registry.loaded  # still serving
        # and a version retired for good is unloaded once its last request ends
        await registry.ensure_loaded(v2)
        store.retire("orders", 2)
        release2 = registry.lease(v2)
        await registry.retire(v2)
        release2()
        await asyncio.sleep(0.05)
        assert "orders@2" not in engine.loaded
        await engine.stop()

    asyncio.run(scenario())


def test_a_retired_version_a_late_request_reloads_is_unloaded_after_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = AdapterStore(tmp_path / "adapters")
        v1 = store.publish(make_adapter(tmp_path / "a1"), "orders")
        engine = FakeEngine()
        registry = AdapterRegistry(store, engine, identify(fake_base(tmp_path)), 64)
        release = registry.lease(v1)  # a request routed to v1 just before it was retired...
        store.retire("orders", 1)
        await registry.reload(v1)  # ...whose engine lost it: reloaded for that request
        assert "orders@1" in engine.loaded
        release()
        await asyncio.sleep(0.05)
        assert "orders@1" not in engine.loaded and "orders@1" not in registry.loaded  # and gone after it
        await engine.stop()

    asyncio.run(scenario())


def test_a_stream_whose_client_leaves_before_its_first_byte_releases_its_slot() -> None:
    from serving.http.relay import RelayResponse

    closed: list[bool] = []
    started: list[bool] = []

    async def relay() -> AsyncIterator[bytes]:
        started.append(True)
        yield b"data: {}\n\n"

    async def close() -> None:
        closed.append(True)

    async def receive() -> dict:
        return {"type": "http.disconnect"}  # the client is already gone

    async def send(message: dict) -> None:
        await asyncio.sleep(0.01)

    scope = {"type": "http", "asgi": {"spec_version": "2.0"}, "method": "POST", "path": "/", "headers": []}
    asyncio.run(RelayResponse(relay(), close, media_type="text/event-stream")(scope, receive, send))  # type: ignore[arg-type]
    assert closed == [True]  # released even though the relay may never have started
