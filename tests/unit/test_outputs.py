"""What comes back (serving/outputs/): the JSON plan and check, client schema bounds, function calling. Plain
functions on plain data: no app, no engine."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from contract.settings import SPACED_JSON
from contract.tools import TOOLS_FORMAT
from serving.config import GatewaySettings
from serving.errors import APIError, ErrorCode
from serving.outputs.jsoncheck import JsonCheck, JsonPlan
from serving.outputs.modes import AliasPolicy
from serving.outputs.schemas import SchemaChecks, bounded, check_client_schema
from serving.outputs.toolcalls import ToolPlan, ToolStream, check_tools
from tests.conftest import orders_schema

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


def test_a_requests_schema_is_enforced_and_sent_as_the_client_wrote_it() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    body = chat(response_format=fmt)
    plan = JsonPlan.for_request(body, orders_schema(), AliasPolicy())
    assert (plan.mode, plan.source, plan.schema) == ("enforce", "request", SCHEMA)
    assert body["response_format"] == fmt


def test_the_operators_layout_reaches_every_enforced_schema_and_is_never_checked() -> None:
    """LORAFLEET_JSON_WHITESPACE=spaced: llguidance's options ride in each schema the engine gets (a client's
    own x-guidance replaced; json_object becomes the object schema it means); the answer is judged on the
    client's schema as written."""
    layout = GatewaySettings(data_dir=Path("/tmp"), dev_mode=True).json_layout
    assert layout == SPACED_JSON
    own = {**SCHEMA, "x-guidance": {"whitespace_pattern": "[ ]*", "lenient": True}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": own, "strict": True}}
    body = chat(response_format=fmt)
    plan = JsonPlan.for_request(body, None, AliasPolicy(), layout=layout)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {**SCHEMA, "x-guidance": SPACED_JSON}, "strict": True},
    }
    assert plan.schema == own and fmt["json_schema"]["schema"] == own  # the client's dict is left alone
    body = chat(response_format={"type": "json_object"})
    JsonPlan.for_request(body, None, AliasPolicy(), layout=layout)
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object", "x-guidance": SPACED_JSON}
    body = chat()
    JsonPlan.for_request(body, SCHEMA, AliasPolicy("enforce"), layout=layout)
    assert body["response_format"]["json_schema"] == {
        "name": "adapter",
        "schema": {**SCHEMA, "x-guidance": SPACED_JSON},
    }
    body = chat(response_format={"type": "json_object"})
    JsonPlan.for_request(body, None, AliasPolicy(), layout=None)  # whitespace any or compact: as written
    assert body["response_format"] == {"type": "json_object"}
    body = chat(response_format=fmt)
    JsonPlan.for_request(body, None, AliasPolicy(), layout=None)  # ...but never with the client's x-guidance
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA


def test_the_adapters_own_schema_is_validated_after_and_not_sent() -> None:
    body = chat()
    plan = JsonPlan.for_request(body, SCHEMA, AliasPolicy())
    assert (plan.mode, plan.source) == ("validate", "adapter") and "response_format" not in body


def test_the_aliases_default_schema_and_mode_come_before_the_adapters() -> None:
    body = chat()
    plan = JsonPlan.for_request(body, orders_schema(), AliasPolicy("enforce", SCHEMA))
    assert (plan.mode, plan.source, plan.schema) == ("enforce", "alias", SCHEMA)
    assert body["response_format"]["json_schema"] == {"name": "alias", "schema": SCHEMA}


def test_the_requests_own_mode_wins_and_text_or_no_schema_is_off() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    body = chat(response_format=fmt)
    assert JsonPlan.for_request(body, None, AliasPolicy("enforce"), mode="validate").mode == "validate"
    assert "response_format" not in body
    assert JsonPlan.for_request(chat(response_format={"type": "text"}), SCHEMA, AliasPolicy()).mode == "off"
    assert JsonPlan.for_request(chat(), None, AliasPolicy()).check() is None  # the base model: nothing to check


def test_a_schema_the_engine_cannot_enforce_is_validated_instead() -> None:
    body = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    plan = JsonPlan.for_request(body, None, AliasPolicy()).validate_instead(body, ("not",))
    assert (plan.mode, plan.unenforced) == ("validate", ("not",)) and "response_format" not in body
    check = plan.check()
    assert check is not None and check.unenforced == ("not",)


def test_a_whole_answer_gets_a_verdict_per_choice() -> None:
    data = {
        "choices": [
            {"index": 0, "message": {"content": '{"a": 1}'}, "finish_reason": "stop"},
            {"index": 1, "message": {"content": '{"a": "one"}'}, "finish_reason": "stop"},
            {"index": 2, "message": {"content": '{"a": 1'}, "finish_reason": "length"},
        ]
    }
    check = JsonCheck(SCHEMA)
    check.add_to(data)
    assert [c["outcome"] for c in check.checks] == ["valid", "schema_mismatch", "truncated"]
    assert check.outcome == "valid" and data["lorafleet"]["json_checks"][1]["errors"]


def test_a_stream_is_judged_once_whole_in_a_last_event() -> None:
    check = JsonCheck(SCHEMA, mode="enforce")
    for piece, finish in (('{"a"', None), (": 2}", "stop")):
        check.observe({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": finish}]})
    event = check.final_event()
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    payload = json.loads(event[len(b"data: ") :])
    assert payload["choices"] == [] and payload["lorafleet"]["json_checks"][0]["outcome"] == "valid"


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ("not an object", "must be a JSON object"),
        ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2000)}}, "properties"),
        ({"type": "string", "pattern": "(?=lookahead)"}, "pattern"),
        ({"type": "nonsense"}, "not a valid JSON Schema"),
        ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "loops"),  # seen on the wire: a 502
        ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "loops"),
        ({"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}, "points at nothing"),
        ({"$ref": "https://example.com/schema.json"}, "points at nothing"),
        ({"$defs": {"a": {"$ref": "#/$defs/a", "description": "x"}}, "$ref": "#/$defs/a"}, "loops"),  # siblings
        ({"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}, "loops"),  # through allOf
        ({"anyOf": [{"$ref": "#"}]}, "loops"),
    ],
)
def test_a_hostile_client_schema_is_refused_with_its_code(schema: Any, says: str) -> None:
    with pytest.raises(APIError) as refused:
        check_client_schema(schema, "response_format")
    error = refused.value
    assert (error.code, error.status, error.param) == (ErrorCode.SCHEMA_REFUSED, 400, "response_format")
    assert says in error.message


def test_a_recursive_structure_is_a_fine_schema() -> None:
    tree = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#"}}},
        "$defs": {"leaf": {"type": "string"}, "alias": {"$ref": "#/$defs/leaf"}},
    }
    check_client_schema(tree)  # no refusal
    anchored = {"$defs": {"x": {"$anchor": "name", "type": "string"}}, "properties": {"n": {"$ref": "#name"}}}
    encoded = {"$defs": {"a b": {"type": "string"}}, "properties": {"n": {"$ref": "#/$defs/a%20b"}}}
    data = {"type": "object", "properties": {"k": {"const": {"$ref": "#/nowhere"}}}}  # data, not a reference
    for schema in (anchored, encoded, data):
        check_client_schema(schema)


def test_a_check_that_takes_too_long_is_cut_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.outputs.schemas as schemas

    monkeypatch.setattr(schemas, "COMPILE_TIMEOUT_S", 0.05)

    def slow() -> None:
        time.sleep(0.5)

    with pytest.raises(APIError) as refused:
        asyncio.run(bounded(slow, "tools"))
    assert refused.value.code is ErrorCode.SCHEMA_REFUSED and "longer than" in refused.value.message
    assert refused.value.param == "tools"


def test_one_tenants_slow_schemas_never_hold_up_anothers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tenant 1 sends ten schemas that each take 2 s to check; tenant 2's quick one still runs at once: a tenant
    holds one of the checks' own threads at a time (until its check really ends), and its queue is its own."""
    import serving.outputs.schemas as schemas

    monkeypatch.setattr(schemas, "COMPILE_TIMEOUT_S", 0.5)
    release = threading.Event()

    def slow() -> None:
        release.wait(5)

    async def run() -> list[BaseException | None]:
        checks = SchemaChecks(threads=2)
        try:
            flood = [asyncio.ensure_future(checks.run(1, slow, "tools")) for _ in range(10)]
            await asyncio.sleep(0.05)
            # In a shared pool this would queue behind the flood and be refused at the budget; it is not.
            await checks.run(2, lambda: None, "response_format")
            return list(await asyncio.gather(*flood, return_exceptions=True))
        finally:
            release.set()
            checks.close()

    outcomes = asyncio.run(run())
    codes = [o.code if isinstance(o, APIError) else o for o in outcomes]
    # The first is cut at the budget (its schema is too slow: 400); the rest waited for their turn past it and are
    # told to retry (429), never refused as if their schemas were at fault.
    assert codes == [ErrorCode.SCHEMA_REFUSED] + [ErrorCode.SCHEMA_CHECKS_BUSY] * 9
    assert all(o.status == 429 and o.headers["Retry-After"] for o in outcomes[1:])  # type: ignore[union-attr]


def test_tools_become_a_call_schema_and_the_prompt_carries_them() -> None:
    body = chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "weather"}})
    plan = ToolPlan.from_request(body, TOOLS_FORMAT, "toolcall")
    assert plan is not None and plan.chosen == "weather"
    assert "tools" not in body and "tool_choice" not in body
    assert plan.schema["properties"]["name"] == {"const": "weather"}
    assert plan.schema["properties"]["arguments"]["required"] == ["city"]
    assert "weather" in json.dumps(body["messages"])  # rendered into the prompt as the adapter was trained


def test_tools_for_an_alias_not_trained_on_calls_and_malformed_tools_are_refused() -> None:
    with pytest.raises(APIError) as unsupported:
        ToolPlan.from_request(chat(tools=[WEATHER]), None, "orders")
    assert (unsupported.value.code, unsupported.value.param) == (ErrorCode.TOOLS_UNSUPPORTED, "tools")
    with pytest.raises(APIError) as malformed:
        check_tools([{"type": "function"}])
    assert malformed.value.code is ErrorCode.INVALID_TOOLS
    with pytest.raises(APIError) as orphan:
        ToolPlan.from_request(chat(tool_choice="required"), TOOLS_FORMAT, "toolcall")
    assert (orphan.value.code, orphan.value.param) == (ErrorCode.INVALID_TOOLS, "tool_choice")
    assert ToolPlan.from_request(chat(tools=[WEATHER], tool_choice="none"), TOOLS_FORMAT, "toolcall") is None


def test_a_call_answer_becomes_tool_calls_whole_and_streamed() -> None:
    plan = ToolPlan([WEATHER["function"]])
    answer = '{"name": "weather", "arguments": {"city": "Lyon"}}'
    data = {"choices": [{"index": 0, "message": {"content": answer}, "finish_reason": "stop"}]}
    plan.rewrite_body(data)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Lyon"}

    stream = ToolStream(plan)
    out: list[bytes] = []
    for piece, finish in ((answer[:10], None), (answer[10:], "stop")):
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
        chunk["choices"] = [{"index": 0, "delta": {"content": piece}, "finish_reason": finish}]
        out += stream.on_event(b"data: " + json.dumps(chunk).encode() + b"\n\n", chunk)
    events = [json.loads(e[len(b"data: ") :]) for e in out]
    assert events[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "weather"
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    plain = ToolStream(plan).on_event(
        b"", {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
    )
    assert json.loads(plain[0][len(b"data: ") :])["choices"][0]["delta"] == {"content": "hi"}
