"""JSON modes, alias policies and function calling in the gateway, against the fake engine."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from contract.settings import SPACED_JSON
from contract.store import AdapterStore
from contract.tools import TOOLS_FORMAT
from serving.app import build_app
from serving.config import GatewaySettings
from serving.state.tenants import TenantStore
from tests.conftest import make_adapter
from tests.fakes import ADMIN_KEY, FakeEngine, assert_openai_error, chat, fake_base

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
RECORD = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[tuple[TestClient, FakeEngine, str]]:
    # A short state cache: the CLI test below writes the database from outside the gateway's own store.
    settings = GatewaySettings(
        data_dir=tmp_path, base_model=str(fake_base(tmp_path)), admin_key=ADMIN_KEY, state_cache_s=0.2
    )
    store = AdapterStore(settings.adapters_dir)
    store.publish(_with_manifest(make_adapter(tmp_path / "orders"), output_schema=RECORD), "orders")
    tools_format = {
        "prompt_format": {
            "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
            "tools_format": TOOLS_FORMAT,
        }
    }
    store.publish(_with_manifest(make_adapter(tmp_path / "calls"), **tools_format), "calls")
    tenants = TenantStore(settings.state_url)
    acme = tenants.create("acme")
    tenants.grant(acme, "orders")
    tenants.grant(acme, "calls")
    key = tenants.issue_key(acme)
    engine = FakeEngine()
    with TestClient(build_app(settings, engine=engine)) as client:
        yield client, engine, key


def _with_manifest(path: Path, **fields: object) -> Path:
    manifest = json.loads((path / "lorafleet.json").read_text())
    (path / "lorafleet.json").write_text(json.dumps(manifest | fields))
    return path


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}


# -- JSON modes -------------------------------------------------------------------------------------


def test_a_request_schema_is_enforced_by_default_and_checked(gw) -> None:
    client, engine, key = gw
    resp = chat(client, key, response_format=schema_format({"type": "object", "required": ["b"]}))
    assert resp.status_code == 200
    sent = engine.requests[-1]["response_format"]["json_schema"]["schema"]
    assert sent == {"type": "object", "required": ["b"], "x-guidance": SPACED_JSON}  # laid out as json.dumps writes
    assert resp.headers["x-lorafleet-json-mode"] == "enforce"
    assert resp.headers["x-lorafleet-json"] == "schema_mismatch"
    check = resp.json()["lorafleet"]["json_checks"][0]
    assert check["valid"] is False and check["errors"] == ["$: 'b' is a required property"]


def test_validate_mode_generates_freely_and_checks_after(gw) -> None:
    client, engine, key = gw
    resp = chat(client, key, response_format=schema_format(RECORD), lorafleet={"json_mode": "validate"})
    assert "response_format" not in engine.requests[-1]  # free generation
    assert resp.headers["x-lorafleet-json-mode"] == "validate" and resp.headers["x-lorafleet-json"] == "valid"
    assert "lorafleet" not in engine.requests[-1]  # the gateway's own options never reach vLLM


def test_off_mode_neither_constrains_nor_checks(gw) -> None:
    client, engine, key = gw
    resp = chat(client, key, response_format=schema_format(RECORD), lorafleet={"json_mode": "off"})
    assert "response_format" not in engine.requests[-1]
    assert resp.headers["x-lorafleet-json-mode"] == "off" and "x-lorafleet-json" not in resp.headers
    assert "lorafleet" not in resp.json()


def test_the_adapter_schema_is_validated_unless_the_alias_says_enforce(gw) -> None:
    client, engine, key = gw
    resp = chat(client, key)
    assert "response_format" not in engine.requests[-1]
    assert resp.headers["x-lorafleet-json-mode"] == "validate" and resp.headers["x-lorafleet-json"] == "valid"
    put = client.put("/admin/aliases/orders/policy", json={"json_mode": "enforce"}, headers=ADMIN)
    assert put.status_code == 200, put.text
    resp = chat(client, key)
    assert engine.requests[-1]["response_format"] == schema_format(RECORD) | {
        "json_schema": {"name": "adapter", "schema": RECORD | {"x-guidance": SPACED_JSON}}
    }
    assert resp.headers["x-lorafleet-json-mode"] == "enforce"
    # The request's own mode wins over the alias's.
    chat(client, key, lorafleet={"json_mode": "validate"})
    assert "response_format" not in engine.requests[-1]


def test_an_admin_default_schema_replaces_the_adapter_schema(gw) -> None:
    client, _, key = gw
    wants_b = {"type": "object", "required": ["b"]}
    put = client.put("/admin/aliases/orders/policy", json={"default_schema": wants_b}, headers=ADMIN)
    assert put.json() == {"alias": "orders", "json_mode": None, "default_schema": wants_b}
    resp = chat(client, key)
    assert resp.headers["x-lorafleet-json"] == "schema_mismatch"
    assert client.get("/admin/aliases/orders/policy", headers=ADMIN).json()["default_schema"] == wants_b
    client.put("/admin/aliases/orders/policy", json={}, headers=ADMIN)  # back to the defaults
    assert chat(client, key).headers["x-lorafleet-json"] == "valid"


def test_a_stream_carries_its_mode_and_verdict(gw) -> None:
    client, _, key = gw
    resp = chat(client, key, stream=True, lorafleet={"json_mode": "validate"})
    assert resp.headers["x-lorafleet-json-mode"] == "validate"
    events = [json.loads(line[6:]) for line in resp.text.split("\n\n") if line.startswith("data: {")]
    assert events[-1]["lorafleet"] == {
        "json_checks": [{"index": 0, "valid": True, "outcome": "valid", "errors": []}],
        "outcome": "valid",
        "mode": "validate",
    }


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"json_mode": "strict"}, 422, "invalid_field"),
        ({"default_schema": {"type": "nope"}}, 400, "schema_refused"),
        ({"default_schema": {"pattern": "(a+)+$"}}, 400, "schema_refused"),
        ({"json_mode": "enforce", "extra": 1}, 422, "invalid_field"),
    ],
)
def test_bad_policies_are_refused(gw, body: dict, status: int, code: str) -> None:
    client, _, _ = gw
    assert_openai_error(client.put("/admin/aliases/orders/policy", json=body, headers=ADMIN), status, code)
    assert client.get("/admin/aliases/orders/policy", headers=ADMIN).json()["json_mode"] is None


def test_policy_routes_need_the_admin_key_and_a_known_alias(gw) -> None:
    client, _, key = gw
    assert_openai_error(client.put("/admin/aliases/orders/policy", json={}), 401)
    assert_openai_error(client.get("/admin/aliases/orders/policy", headers={"Authorization": f"Bearer {key}"}), 401)
    assert_openai_error(client.put("/admin/aliases/nope/policy", json={}, headers=ADMIN), 404, "alias_not_found")


def test_an_unknown_request_mode_is_a_422(gw) -> None:
    client, engine, key = gw
    sent = len(engine.requests)
    error = assert_openai_error(chat(client, key, lorafleet={"json_mode": "strict"}), 422, "invalid_field")
    assert error["param"] == "lorafleet.json_mode" and len(engine.requests) == sent


# -- function calling -------------------------------------------------------------------------------


def test_tools_are_rendered_as_trained_and_the_call_comes_back_as_tool_calls(gw) -> None:
    client, engine, key = gw
    engine.answer = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    resp = chat(client, key, model="calls", tools=[WEATHER, TIME])
    assert resp.status_code == 200, resp.text
    sent = engine.requests[-1]
    assert "tools" not in sent and "tool_choice" not in sent
    system, user = sent["messages"]
    assert system["role"] == "system" and '"name": "get_weather"' in system["content"] and user["content"] == "hi"
    assert sent["response_format"]["json_schema"]["schema"]["anyOf"][0]["properties"]["name"] == {
        "const": "get_weather"
    }
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert resp.headers["x-lorafleet-json"] == "valid"


def test_tool_choice_naming_a_function_constrains_to_its_call(gw) -> None:
    client, engine, key = gw
    engine.answer = '{"name": "get_time", "arguments": {}}'
    choice = {"type": "function", "function": {"name": "get_time"}}
    resp = chat(client, key, model="calls", tools=[WEATHER, TIME], tool_choice=choice)
    schema = engine.requests[-1]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["name"] == {"const": "get_time"}
    assert resp.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"


def test_tool_choice_none_leaves_the_tools_out(gw) -> None:
    client, engine, key = gw
    resp = chat(client, key, model="calls", tools=[WEATHER], tool_choice="none")
    assert [m["role"] for m in engine.requests[-1]["messages"]] == ["user"]
    assert resp.json()["choices"][0]["message"]["content"] == '{"a": 1}'


def test_an_answer_that_is_not_a_call_stays_content(gw) -> None:
    client, engine, key = gw
    engine.answer = "I cannot help with that."
    resp = chat(client, key, model="calls", tools=[WEATHER], lorafleet={"json_mode": "validate"})
    choice = resp.json()["choices"][0]
    assert choice["message"]["content"] == "I cannot help with that." and choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"] and resp.headers["x-lorafleet-json"] == "invalid_json"


def test_a_streamed_call_arrives_as_a_tool_calls_delta(gw) -> None:
    client, engine, key = gw
    engine.answer = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    resp = chat(client, key, model="calls", tools=[WEATHER], stream=True)
    events = [json.loads(line[6:]) for line in resp.text.split("\n\n") if line.startswith("data: {")]
    deltas = [c["delta"] for e in events for c in e["choices"]]
    assert not any(d.get("content") for d in deltas)  # the JSON text never leaks as content
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls == [
        [
            {
                "index": 0,
                "id": calls[0][0]["id"],
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ]
    ]
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["tool_calls"]
    assert events[-1]["lorafleet"]["outcome"] == "valid"
    assert resp.text.endswith("data: [DONE]\n\n")


def test_earlier_calls_in_the_conversation_are_written_as_the_adapter_writes_them(gw) -> None:
    client, engine, key = gw
    history = [
        {"role": "user", "content": "weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
        {"role": "user", "content": [{"type": "text", "text": "and Paris?"}]},
    ]
    assert chat(client, key, model="calls", tools=[WEATHER], messages=history).status_code == 200
    sent = engine.requests[-1]["messages"]
    assert json.loads(sent[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert sent[3] == {"role": "tool", "content": "-3 C"} and sent[4]["content"] == "and Paris?"


@pytest.mark.parametrize(
    ("extra", "code", "param"),
    [
        ({"model": "orders", "tools": [WEATHER]}, "tools_unsupported", "tools"),
        ({"tools": []}, "invalid_tools", "tools"),
        ({"tools": [{"type": "function"}]}, "invalid_tools", "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "invalid_tools", "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "invalid_tools", "tools[1].function.name"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "invalid_tools",
            "tool_choice",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "invalid_tools", "tool_choice"),
        ({"tool_choice": "auto"}, "invalid_tools", "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"pattern": "(a|aa)*$"}}}]},
            "schema_refused",
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_tools_are_refused_before_the_engine(gw, extra: dict, code: str, param: str) -> None:
    client, engine, key = gw
    sent = len(engine.requests)
    error = assert_openai_error(chat(client, key, **({"model": "calls"} | extra)), 400, code)
    assert error["param"] == param and len(engine.requests) == sent


def test_tools_belong_to_chat_completions(gw) -> None:
    client, _, key = gw
    resp = client.post(
        "/v1/completions",
        json={"model": "calls", "prompt": "x", "tools": [WEATHER]},
        headers={"Authorization": f"Bearer {key}"},
    )
    error = assert_openai_error(resp, 400, "unsupported_parameter")
    assert error["param"] == "tools" and "/v1/chat/completions" in error["message"]


def test_the_cli_sets_the_policy_the_gateway_reads(gw, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from lorafleet.cli import app

    client, engine, key = gw
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path))
    schema = tmp_path / "wants-b.json"
    schema.write_text(json.dumps({"type": "object", "required": ["b"]}))
    run = CliRunner().invoke(app, ["adapters", "policy", "orders", "--json-mode", "enforce", "--schema", str(schema)])
    assert run.exit_code == 0, run.output
    assert "orders: json_mode enforce; schema set by admin" in run.output
    resp = chat(client, key)
    sent = engine.requests[-1]["response_format"]["json_schema"]["schema"]
    assert sent == {"type": "object", "required": ["b"], "x-guidance": SPACED_JSON}  # laid out as json.dumps writes
    assert resp.headers["x-lorafleet-json"] == "schema_mismatch"

    bad = tmp_path / "bad.json"
    bad.write_text('{"type": 3}')
    for args, message in [
        (["--json-mode", "strict"], "use one of enforce, validate, off"),
        (["--schema", str(bad)], "not a valid JSON Schema"),
        (["--schema", str(tmp_path / "missing.json")], "No such file"),
    ]:
        run = CliRunner().invoke(app, ["adapters", "policy", "orders", *args])
        assert run.exit_code != 0 and message in run.output, run.output
    run = CliRunner().invoke(app, ["adapters", "policy", "nope", "--reset"])
    assert run.exit_code != 0 and "no alias 'nope'" in run.output
    assert CliRunner().invoke(app, ["adapters", "policy", "orders", "--reset"]).exit_code == 0
    # The CLI writes the database: a running gateway sees it once its cached policy is older than state_cache_s
    # (the first request after that may still get the old one while the new one is read: stale-while-revalidate).
    deadline = time.monotonic() + 5
    while chat(client, key).headers["x-lorafleet-json"] != "valid":
        assert time.monotonic() < deadline, "the gateway never saw the policy reset"
        time.sleep(0.05)


def test_a_schema_that_takes_too_long_to_compile_is_refused_in_bounded_time(gw, monkeypatch) -> None:
    import serving.outputs.schemas

    client, engine, key = gw
    monkeypatch.setattr(serving.outputs.schemas, "COMPILE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(serving.outputs.schemas, "check_schema", lambda schema: time.sleep(1.5))
    sent, started = len(engine.requests), time.monotonic()
    resp = chat(client, key, response_format=schema_format({"type": "object", "title": "slow to compile"}))
    assert time.monotonic() - started < 1.2
    error = assert_openai_error(resp, 400, "schema_refused")
    assert "took longer than 0.2 s" in error["message"] and len(engine.requests) == sent
