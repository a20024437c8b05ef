"""Enforced JSON's layout on a real gateway and engine with a real adapter (the defaults:
LORAFLEET_JSON_BACKEND=guidance, LORAFLEET_JSON_WHITESPACE=spaced): json.dumps' separators and no other
whitespace between tokens, so an answer leaves no room for whitespace loops and the adapter keeps its own
tokens."""

from __future__ import annotations

import json

from tests.conftest import ORDERS, ROOT, Gateway, client


def _whitespace_outside_strings(text: str) -> list[int]:
    """Where ``text`` (JSON, perhaps cut short) has whitespace between tokens rather than inside a string."""
    found, in_string, escaped = [], False, False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif in_string:
            escaped = ch == "\\"
            in_string = ch != '"'
        elif ch == '"':
            in_string = True
        elif ch.isspace():
            found.append(i)
    return found


def test_enforced_json_leaves_no_room_for_whitespace_loops(live_gateway: Gateway) -> None:
    """A real-world schema the adapter never saw (one of the bundled JSON Schema Store files), the adapter's own
    task phrased with the email ending a sentence, and json_object: between tokens, every enforced answer holds
    one space after each ',' and ':' and no other whitespace, so none can spend max_tokens on it."""
    api = client(live_gateway)
    kind = json.loads((ROOT / "data/schemas/schemastore/kind-cluster.json").read_text())
    robust = [json.loads(line) for line in (ORDERS / "robust.jsonl").read_text().splitlines()]
    email_last = next(
        r["instruction"]
        for r in robust
        if r["instruction"].endswith(f"{json.loads(r['output'])['customer']['email']}.")
    )
    asks = [
        ("Write an example kind cluster configuration as a JSON object.", _schema(kind)),
        (email_last, _schema(json.loads((ORDERS / "schema.json").read_text()))),
        (email_last, {"type": "json_object"}),
    ]
    for prompt, response_format in asks:
        resp = api.chat.completions.create(
            model="orders",
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=200,
            response_format=response_format,  # type: ignore[arg-type]
        )
        text = resp.choices[0].message.content or ""
        spaces = _whitespace_outside_strings(text)
        assert text.startswith("{") and spaces, text  # these answers have more than one key
        assert all(text[i] == " " and text[i - 1] in ",:" and not text[i + 1 : i + 2].isspace() for i in spaces), text


def _schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
