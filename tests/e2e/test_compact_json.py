"""Compact enforced JSON (LORAFLEET_JSON_BACKEND=guidance, LORAFLEET_JSON_COMPACT=true) on a real gateway and
engine with a real adapter: an enforced answer leaves no room for whitespace loops."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from contract.store import AdapterStore
from lorafleet.launch import RunningGateway, start_gateway
from serving.state.tenants import TenantStore
from tests.conftest import ORDERS, ROOT, session_gateway_steps_aside


@pytest.fixture(scope="module")
def compact(tiny_adapter: Path, base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    session_gateway_steps_aside()  # one engine at a time on a small machine
    data_dir = tmp_path_factory.mktemp("compact")
    AdapterStore(data_dir / "adapters").publish(tiny_adapter, "orders")
    tenants = TenantStore(f"sqlite:///{data_dir / 'state.db'}")
    tenant = tenants.create("acme")
    tenants.grant(tenant, "orders")
    key = tenants.issue_key(tenant)
    running: RunningGateway = start_gateway(data_dir, base_model, json_backend="guidance", json_compact="true")
    yield running, key
    running.stop()


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


def test_enforced_json_leaves_no_room_for_whitespace_loops(compact: tuple) -> None:
    """A real-world schema the adapter never saw (one of the bundled JSON Schema Store files) and the adapter's
    own task phrased with the email ending a sentence: the enforced answers have no whitespace between tokens,
    so none can spend max_tokens on it."""
    running, key = compact
    api = openai.OpenAI(base_url=f"{running.url}/v1", api_key=key, max_retries=0, timeout=120)
    kind = json.loads((ROOT / "data/schemas/schemastore/kind-cluster.json").read_text())
    robust = [json.loads(line) for line in (ORDERS / "robust.jsonl").read_text().splitlines()]
    email_last = next(
        r["instruction"]
        for r in robust
        if r["instruction"].endswith(f"{json.loads(r['output'])['customer']['email']}.")
    )
    asks = [
        ("Write an example kind cluster configuration as a JSON object.", kind),
        (email_last, json.loads((ORDERS / "schema.json").read_text())),
    ]
    for prompt, schema in asks:
        resp = api.chat.completions.create(
            model="orders",
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
        text = resp.choices[0].message.content or ""
        assert text.startswith("{") and not _whitespace_outside_strings(text), text
