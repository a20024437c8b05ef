"""The gateway's own logic against a fake engine: auth, access, routing, errors, streaming, readiness."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from contract.settings import SPACED_JSON
from contract.store import AdapterStore
from serving.app import build_app
from serving.config import GatewaySettings
from serving.outputs.modes import AliasPolicy
from serving.state.policies import AliasPolicies
from serving.state.tenants import DEFAULT_LIMITS, TenantStore, key_id_of
from tests.conftest import make_adapter
from tests.fakes import ADMIN_KEY, FakeEngine, assert_openai_error, chat, fake_base, leave_after, tar_of


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[TestClient, FakeEngine, dict[str, str]]]:
    settings = GatewaySettings(data_dir=tmp_path, base_model=str(fake_base(tmp_path)), admin_key=ADMIN_KEY)
    store = AdapterStore(settings.adapters_dir)
    store.publish(make_adapter(tmp_path / "src-orders"), "orders")
    store.publish(make_adapter(tmp_path / "src-orders2"), "orders")
    store.publish(make_adapter(tmp_path / "src-secret"), "secret")
    tenants = TenantStore(settings.state_url)
    acme, other = tenants.create("acme"), tenants.create("other")
    tenants.grant(acme, "orders")
    tenants.grant(other, "secret")
    keys = {"acme": tenants.issue_key(acme), "other": tenants.issue_key(other)}
    engine = FakeEngine()
    with TestClient(build_app(settings, engine=engine)) as client:
        yield client, engine, keys


def test_alias_routes_to_its_newest_version_with_the_recorded_template(gateway) -> None:
    client, engine, keys = gateway
    resp = chat(client, keys["acme"])
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "orders@2"
    assert resp.headers["x-lorafleet-adapter"] == "orders@2"
    sent = engine.requests[-1]
    assert sent["model"] == "orders@2"
    assert sent["chat_template"] == "{% for m in messages %}{{ m.content }}{% endfor %}"


def test_the_base_alias_is_the_bare_base_model_for_tenants_granted_it(gateway, tmp_path: Path) -> None:
    client, engine, keys = gateway
    assert_openai_error(chat(client, keys["acme"], model="base"), 404, "model_not_found")
    assert admin(client, "PUT", "/tenants/acme/grants/base").status_code == 200
    resp = chat(client, keys["acme"], model="base")
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-lorafleet-adapter"] == "base"
    sent = engine.requests[-1]
    assert sent["model"] == "base" and "chat_template" not in sent  # the base model's own template
    models = client.get("/v1/models", headers={"Authorization": f"Bearer {keys['acme']}"}).json()["data"]
    assert {m["id"] for m in models} == {"base", "orders"}


def test_an_alias_still_training_is_503_with_its_eta(gateway, tmp_path: Path) -> None:
    client, _, keys = gateway
    store = AdapterStore(tmp_path / "adapters")
    assert admin(client, "PUT", "/tenants/acme/grants/fresh").status_code == 200
    assert_openai_error(chat(client, keys["acme"], model="fresh"), 404, "model_not_found")
    store.announce_training("fresh", {"phase": "training", "step": 30, "max_steps": 60, "eta_s": 150.2})
    resp = chat(client, keys["acme"], model="fresh")
    error = assert_openai_error(resp, 503, "model_training")
    assert resp.headers["retry-after"] == "151"
    assert "still training (step 30 of 60)" in error["message"] and "about 3 min" in error["message"]
    store.announce_training("fresh", {"phase": "preparing"})
    resp = chat(client, keys["acme"], model="fresh")
    assert_openai_error(resp, 503, "model_training")
    assert resp.headers["retry-after"] == "30"
    store.announce_training("fresh", {"phase": "queued"})
    assert "queued behind another training run" in chat(client, keys["acme"], model="fresh").json()["error"]["message"]
    # An announcement nobody refreshes is from a run that died: the alias is back to not existing.
    path = tmp_path / "adapters" / "fresh" / "training.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"updated_at": time.time() - 600}))
    assert_openai_error(chat(client, keys["acme"], model="fresh"), 404, "model_not_found")
    # Another tenant never learns that the alias is training.
    store.announce_training("fresh", {"phase": "training", "step": 1, "max_steps": 2, "eta_s": 5})
    assert_openai_error(chat(client, keys["other"], model="fresh"), 404, "model_not_found")


@pytest.mark.parametrize("header", [None, "Bearer ", "Bearer lf-wrong", "Basic abc", "lf-x"])
def test_missing_or_bad_key_is_401(gateway, header: str | None) -> None:
    client, _, _ = gateway
    headers = {"Authorization": header} if header is not None else {}
    resp = client.post(
        "/v1/chat/completions",
        json={"model": "orders", "messages": [{"role": "user", "content": "x"}]},
        headers=headers,
    )
    error = assert_openai_error(resp, 401, "invalid_api_key")
    assert error["type"] == "authentication_error"


def test_another_tenants_alias_looks_like_no_alias(gateway) -> None:
    client, engine, keys = gateway
    theirs = assert_openai_error(chat(client, keys["acme"], model="secret"), 404, "model_not_found")
    missing = assert_openai_error(chat(client, keys["acme"], model="nope"), 404, "model_not_found")
    assert theirs["message"].replace("secret", "X") == missing["message"].replace("nope", "X")
    assert all(r["model"] != "secret@1" for r in engine.requests)


def test_models_lists_only_the_callers_aliases(gateway) -> None:
    client, _, keys = gateway
    resp = client.get("/v1/models", headers={"Authorization": f"Bearer {keys['other']}"})
    assert [m["id"] for m in resp.json()["data"]] == ["secret"]


def test_client_cannot_set_the_chat_template(gateway) -> None:
    client, engine, keys = gateway
    n = len(engine.requests)
    assert_openai_error(chat(client, keys["acme"], chat_template="{{ evil }}"), 400, "unsupported_parameter")
    assert len(engine.requests) == n


@pytest.mark.parametrize("body", [{"messages": []}, {"n": 0}, {"max_tokens": 0}, {"messages": "hi"}])
def test_invalid_fields_are_422(gateway, body: dict) -> None:
    client, _, keys = gateway
    assert_openai_error(chat(client, keys["acme"], **body), 422, "invalid_field")


def test_malformed_json_body_is_an_openai_error(gateway) -> None:
    client, _, keys = gateway
    resp = client.post(
        "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {keys['acme']}", "content-type": "application/json"},
    )
    assert "not valid JSON" in assert_openai_error(resp, 400, "invalid_json")["message"]


def test_streaming_is_relayed_as_server_sent_events(gateway) -> None:
    client, _, keys = gateway
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "orders", "stream": True, "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {keys['acme']}"},
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(x[6:])["choices"][0]["delta"]["content"] for x in lines[:-1])
    assert json.loads(text) == {"a": 1}


@pytest.mark.parametrize(
    ("schema", "outcome"), [({"required": ["a"]}, "valid"), ({"required": ["b"]}, "schema_mismatch")]
)
def test_a_streams_json_verdict_is_its_last_event(gateway, schema: dict, outcome: str) -> None:
    client, _, keys = gateway
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    body = {"model": "orders", "stream": True, "messages": [{"role": "user", "content": "x"}], "response_format": fmt}
    with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {keys['acme']}"}
    ) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["choices"] == [] and final["lorafleet"]["outcome"] == outcome
    [check] = final["lorafleet"]["json_checks"]
    assert check["index"] == 0 and check["valid"] is (outcome == "valid")
    assert "".join(json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-2]) == '{"a": 1}'


def test_engine_not_ready_is_503_with_retry_after(gateway) -> None:
    client, engine, keys = gateway
    engine.ready = False
    resp = chat(client, keys["acme"])
    assert_openai_error(resp, 503, "engine_starting")
    assert resp.headers["retry-after"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json() == {"status": "not_ready", "reason": "the engine is starting"}


def test_readiness_names_nothing_without_the_admin_key(gateway) -> None:
    client, _, keys = gateway
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and len(health["instance"]) == 16
    for headers in ({}, {"Authorization": f"Bearer {keys['acme']}"}, {"Authorization": "Bearer wrong"}):
        ready = client.get("/readyz", headers=headers)
        assert ready.status_code == 200 and ready.json() == {"status": "ready", "reason": None}
    details = client.get("/readyz", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert details["adapters_loaded"] == ["orders@2", "secret@1"] and details["adapters_pending"] == []
    assert details["engine_adapters"] == details["adapters_loaded"]  # what the engine itself says it holds


def test_misfit_adapter_is_refused_before_the_engine(tmp_path: Path) -> None:
    settings = GatewaySettings(data_dir=tmp_path, base_model="example/base-model", max_lora_rank=8, admin_key=ADMIN_KEY)
    store = AdapterStore(settings.adapters_dir)
    store.publish(make_adapter(tmp_path / "big", rank=64), "big")
    store.publish(make_adapter(tmp_path / "dora", use_dora=True), "dora")
    tenants = TenantStore(settings.state_url)
    t = tenants.create("t")
    tenants.grant(t, "big")
    key = tenants.issue_key(t)
    engine = FakeEngine()
    with TestClient(build_app(settings, engine=engine)) as client:
        assert engine.loaded == []
        assert_openai_error(chat(client, key, model="big"), 503, "adapter_unavailable")
        # One tenant's broken adapter never takes the gateway out of service; the admin details and metrics name it.
        assert client.get("/readyz").status_code == 200
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert client.get("/readyz", headers=admin).json()["adapters_pending"] == ["big", "dora"]
        assert "lorafleet_adapters_pending 2.0" in client.get("/metrics").text


def test_unknown_routes_and_methods_are_openai_errors(gateway) -> None:
    client, _, keys = gateway
    assert_openai_error(client.get("/v1/nope", headers={"Authorization": f"Bearer {keys['acme']}"}), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)


def test_unsafe_settings_are_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port and engine_port are both 8100"):
        GatewaySettings(data_dir=tmp_path, port=8100, engine_port=8100, admin_key=ADMIN_KEY)
    with pytest.raises(ValueError, match="max_lora_rank=0"):
        GatewaySettings(data_dir=tmp_path, max_lora_rank=0, admin_key=ADMIN_KEY)
    with pytest.raises(ValueError, match="no admin key: set LORAFLEET_ADMIN_KEY"):
        GatewaySettings(data_dir=tmp_path)
    with pytest.raises(ValueError, match="admin_key: use at least 16 characters"):
        GatewaySettings(data_dir=tmp_path, admin_key="short")
    with pytest.raises(ValueError, match=r"dev_mode without an admin key listens only on loopback, not 0\.0\.0\.0"):
        GatewaySettings(data_dir=tmp_path, dev_mode=True, host="0.0.0.0")
    with pytest.raises(ValueError, match=r"no metrics key while listening on 0\.0\.0\.0"):
        GatewaySettings(data_dir=tmp_path, admin_key=ADMIN_KEY, host="0.0.0.0")
    GatewaySettings(data_dir=tmp_path, admin_key=ADMIN_KEY, host="0.0.0.0", metrics_key="scrape-secret-0123")
    assert GatewaySettings(data_dir=tmp_path, dev_mode=True).admin_key is None


@pytest.mark.parametrize(
    ("response_format", "outcome", "errors"),
    [
        ({"type": "json_object"}, "valid", []),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "required": ["a"]}}},
            "valid",
            [],
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "b", "schema": {"required": ["b"]}}},
            "schema_mismatch",
            ["$: 'b' is a required property"],
        ),
    ],
)
def test_json_answers_are_checked_by_the_shared_judge(
    gateway, response_format: dict, outcome: str, errors: list
) -> None:
    client, engine, keys = gateway
    resp = chat(client, keys["acme"], response_format=response_format)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-lorafleet-json"] == outcome
    [check] = resp.json()["lorafleet"]["json_checks"]
    assert check == {"index": 0, "valid": outcome == "valid", "outcome": outcome, "errors": errors}
    # vLLM still enforces it, laid out as json.dumps writes JSON (LORAFLEET_JSON_WHITESPACE=spaced)
    schema = response_format.get("json_schema", {}).get("schema", {"type": "object"})
    name = response_format.get("json_schema", {}).get("name", "json_object")
    sent = {"type": "json_schema", "json_schema": {"name": name, "schema": schema | {"x-guidance": SPACED_JSON}}}
    assert engine.requests[-1]["response_format"] == sent


def test_client_regex_schemas_get_a_verdict_too(gateway) -> None:
    client, engine, keys = gateway
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[0-9]{5}$"}}}
    regex = {"type": "json_schema", "json_schema": {"name": "e", "schema": schema}}
    engine.answer = '{"a": "27049"}'
    good = chat(client, keys["acme"], response_format=regex)
    assert good.status_code == 200 and good.headers["x-lorafleet-json"] == "valid"
    engine.answer = '{"a": "2704"}'
    bad = chat(client, keys["acme"], response_format=regex)
    assert bad.headers["x-lorafleet-json"] == "schema_mismatch"
    assert bad.json()["lorafleet"]["json_checks"][0]["errors"] == ["$.a: '2704' does not match '^[0-9]{5}$'"]
    engine.answer = "not json at all"  # parse failures are reported whatever the schema holds
    assert chat(client, keys["acme"], response_format=regex).headers["x-lorafleet-json"] == "invalid_json"
    engine.answer = '{"a": 1}'

    plain = chat(client, keys["acme"])  # no response_format and no schema in the manifest: nothing to check
    assert "x-lorafleet-json" not in plain.headers and "lorafleet" not in plain.json()


# -- the admin API, tenants, keys and limits ----------------------------------------------------


def admin(client: TestClient, method: str, path: str, key: str | None = ADMIN_KEY, **kw: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.request(method, f"/admin{path}", headers=headers, **kw)  # type: ignore[arg-type]


def test_admin_api_needs_the_admin_key_not_a_tenant_key(gateway) -> None:
    client, _, keys = gateway
    assert_openai_error(admin(client, "GET", "/tenants", key=None), 401, "invalid_admin_key")
    assert_openai_error(admin(client, "GET", "/tenants", key=keys["acme"]), 401, "invalid_admin_key")
    assert_openai_error(chat(client, ADMIN_KEY), 401, "invalid_api_key")  # and the admin key is no tenant key
    assert [t["name"] for t in admin(client, "GET", "/tenants").json()["data"]] == ["acme", "other"]


def test_admin_posts_need_a_json_body_so_no_web_page_can_send_one(tmp_path: Path) -> None:
    # Development mode: no admin key at all, so only the body stands between a visited page and a key rotation.
    settings = GatewaySettings(data_dir=tmp_path, base_model=str(fake_base(tmp_path)), dev_mode=True)
    tenants = TenantStore(settings.state_url)
    tenants.grant(tenants.create("acme"), "orders")
    with TestClient(build_app(settings, engine=FakeEngine())) as client:
        form = client.post("/admin/tenants/acme/keys", data={"rotate": "true"})  # what an HTML form sends
        assert_openai_error(form, 415, "json_body_required")
        text = client.post("/admin/tenants/acme/keys", content=b"x", headers={"content-type": "text/plain"})
        assert_openai_error(text, 415, "json_body_required")
        assert_openai_error(client.post("/admin/tenants/acme/keys"), 400, "json_body_required")
        assert tenants.keys(tenants.require("acme")) == []  # nothing was issued
        assert client.post("/admin/tenants/acme/keys", json={}).status_code == 201
        # The canary routes too: an empty cross-site POST could promote, roll back or abort.
        for action in ("promote", "rollback", "abort", "pause", "resume"):
            plain = client.post(f"/admin/canaries/orders/{action}", content=b"", headers={"content-type": "text/plain"})
            assert_openai_error(plain, 415, "json_body_required")
            assert_openai_error(client.post(f"/admin/canaries/orders/{action}"), 400, "json_body_required")
        assert_openai_error(client.post("/admin/canaries/orders/abort", json={}), 404, "no_canary")  # JSON: heard


def test_tenant_lifecycle_through_the_admin_api(gateway) -> None:
    client, _, _ = gateway
    created = admin(client, "POST", "/tenants", json={"name": "beta", "aliases": ["orders"]})
    assert created.status_code == 201, created.text
    first = created.json()["api_key"]
    assert chat(client, first).status_code == 200
    assert_openai_error(admin(client, "POST", "/tenants", json={"name": "beta"}), 400, "tenant_refused")
    assert_openai_error(admin(client, "POST", "/tenants", json={"name": "Bad Name!"}), 422, "invalid_field")

    # Rotation: the new key works at once, the old one is refused from now on.
    rotated = admin(client, "POST", "/tenants/beta/keys", params={"rotate": "true"}, json={}).json()["api_key"]
    assert_openai_error(chat(client, first), 401)
    assert chat(client, rotated).status_code == 200
    second = admin(client, "POST", "/tenants/beta/keys", json={}).json()
    assert admin(client, "DELETE", f"/tenants/beta/keys/{second['key_id']}").status_code == 204
    assert_openai_error(chat(client, second["api_key"]), 401)
    assert chat(client, rotated).status_code == 200
    shown = admin(client, "GET", "/tenants/beta").json()
    assert [k["revoked_at"] is None for k in shown["keys"]] == [False, True, False]
    assert all(k["key_id"].startswith("lf-") and len(k["key_id"]) == 11 for k in shown["keys"])

    # Default alias: a request without a model gets it.
    assert_openai_error(admin(client, "PATCH", "/tenants/beta", json={"default_alias": "secret"}), 400)
    assert admin(client, "PATCH", "/tenants/beta", json={"default_alias": "orders"}).json()["default_alias"] == "orders"
    resp = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {rotated}"},
    )
    assert resp.status_code == 200 and resp.headers["x-lorafleet-adapter"] == "orders@2"

    # Revoking the grant hides the alias; disabling the tenant refuses its keys.
    assert admin(client, "DELETE", "/tenants/beta/grants/orders").json()["aliases"] == []
    assert_openai_error(chat(client, rotated), 404, "model_not_found")
    assert admin(client, "PUT", "/tenants/beta/grants/orders").json()["aliases"] == ["orders"]
    assert admin(client, "PATCH", "/tenants/beta", json={"disabled": True}).json()["disabled"] is True
    assert_openai_error(chat(client, rotated), 401)
    assert_openai_error(admin(client, "GET", "/tenants/nobody"), 404, "tenant_not_found")


def test_requests_per_minute_limit_gives_429_with_retry_after(gateway) -> None:
    client, engine, keys = gateway
    assert admin(client, "PATCH", "/tenants/acme", json={"limits": {"requests_per_minute": 3}}).status_code == 200
    assert [chat(client, keys["acme"]).status_code for _ in range(3)] == [200, 200, 200]
    sent = len(engine.requests)
    error = assert_openai_error(chat(client, keys["acme"]), 429, "rate_limit_exceeded")
    assert "3 requests per minute" in error["message"]
    assert len(engine.requests) == sent  # refused before the engine
    assert int(chat(client, keys["acme"]).headers["retry-after"]) >= 1
    assert chat(client, keys["other"], model="secret").status_code == 200  # another tenant is unaffected


def test_max_tokens_limit_refuses_more_and_fills_in_the_limit(gateway) -> None:
    client, engine, keys = gateway
    admin(client, "PATCH", "/tenants/acme", json={"limits": {"max_tokens": 50}})
    assert_openai_error(chat(client, keys["acme"], max_tokens=51), 400, "max_tokens_over_limit")
    assert_openai_error(chat(client, keys["acme"], max_completion_tokens=500), 400, "max_tokens_over_limit")
    assert chat(client, keys["acme"]).status_code == 200
    assert engine.requests[-1]["max_tokens"] == 50
    assert_openai_error(admin(client, "PATCH", "/tenants/acme", json={"limits": {"max_tokens": 0}}), 422)


def test_concurrency_limit_counts_streams_until_they_end(gateway) -> None:
    client, _, keys = gateway
    admin(client, "PATCH", "/tenants/acme", json={"limits": {"max_concurrent": 1}})
    state = client.app.state.gateway  # type: ignore[attr-defined]
    tenant = state.tenants.require("acme")
    slot = state.limiter.admit(tenant)  # one request in flight
    assert_openai_error(chat(client, keys["acme"]), 429, "concurrency_limit_exceeded")
    slot.release()
    body = {"model": "orders", "messages": [{"role": "user", "content": "x"}], "stream": True}
    auth = {"Authorization": f"Bearer {keys['acme']}"}
    with client.stream("POST", "/v1/chat/completions", headers=auth, json=body) as r:
        assert r.status_code == 200
        "".join(r.iter_text())
    assert state.limiter.in_flight(tenant) == 0
    assert chat(client, keys["acme"]).status_code == 200


def test_a_client_that_leaves_a_whole_answer_gives_back_its_slot_and_lease(gateway) -> None:
    """Two non-streamed requests whose clients hang up before the engine answers: both end 499, and the tenant's
    two slots and the adapter's lease are free again (they were held for good: every later request 429)."""
    client, engine, keys = gateway
    admin(client, "PATCH", "/tenants/acme", json={"limits": {"max_concurrent": 2}})
    state = client.app.state.gateway  # type: ignore[attr-defined]
    tenant = state.tenants.require("acme")
    engine.answer_delay = 5.0
    body = {"model": "orders", "messages": [{"role": "user", "content": "hi"}]}
    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(lambda _: leave_after(client, keys["acme"], body, 0.2), range(2)))
    assert statuses == [499, 499]
    assert state.limiter.in_flight(tenant) == 0
    assert all(count == 0 for count in state.adapters.in_flight.values())  # the adapter lease too
    engine.answer_delay = 0.0
    assert chat(client, keys["acme"]).status_code == 200


def test_leaving_early_is_no_way_around_the_tokens_per_minute(gateway) -> None:
    """A request whose client leaves before the engine says what it used is charged the most it could have
    used (its prompt and its max_tokens); one refused before the engine is charged nothing."""
    client, engine, keys = gateway
    admin(client, "PATCH", "/tenants/acme", json={"limits": {"tokens_per_minute": 300}})
    for _ in range(3):
        assert_openai_error(chat(client, keys["acme"], model="nothing"), 404, "model_not_found")
    engine.answer_delay = 5.0
    body = {"model": "orders", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400}
    assert leave_after(client, keys["acme"], body, 0.2) == 499
    engine.answer_delay = 0.0
    assert_openai_error(chat(client, keys["acme"]), 429, "token_rate_limit_exceeded")


def test_a_tenant_over_its_limits_gets_429_before_its_schemas_are_checked(gateway) -> None:
    client, _, keys = gateway
    admin(client, "PATCH", "/tenants/acme", json={"limits": {"requests_per_minute": 1}})
    assert chat(client, keys["acme"]).status_code == 200
    hostile = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    # Checking it would be a 400: over the limit, no work is done on it at all.
    assert_openai_error(chat(client, keys["acme"], response_format=hostile), 429, "rate_limit_exceeded")


def test_a_new_tenant_gets_a_budget_per_request_unless_told_otherwise(gateway) -> None:
    client, _, _ = gateway
    plain = admin(client, "POST", "/tenants", json={"name": "plain", "aliases": ["orders"]}).json()
    assert plain["limits"]["max_tokens"] == DEFAULT_LIMITS.max_tokens == 4096
    unlimited = admin(client, "POST", "/tenants", json={"name": "open", "limits": {"max_tokens": None}}).json()
    assert unlimited["limits"]["max_tokens"] is None  # said so explicitly
    big = {"n": 16, "max_tokens": 2048}
    assert_openai_error(chat(client, plain["api_key"], **big), 400, "max_tokens_over_limit")


def test_a_tenant_is_created_whole_or_not_at_all(gateway) -> None:
    client, _, _ = gateway
    bad = admin(client, "POST", "/tenants", json={"name": "beta", "aliases": ["orders", "Not An Alias"]})
    assert_openai_error(bad, 400, "tenant_refused")
    assert "Not An Alias" in bad.json()["error"]["message"]
    assert_openai_error(admin(client, "GET", "/tenants/beta"), 404, "tenant_not_found")  # nothing half-made
    again = admin(client, "POST", "/tenants", json={"name": "beta", "aliases": ["orders"]})
    assert again.status_code == 201 and chat(client, again.json()["api_key"]).status_code == 200


def test_a_whole_answer_is_bounded_in_tokens_and_logprobs_and_a_stream_is_not(gateway) -> None:
    client, _, keys = gateway  # acme has no limits at all
    huge = {"n": 16, "logprobs": True, "top_logprobs": 20}  # no max_tokens: the model's length each
    error = assert_openai_error(chat(client, keys["acme"], **huge), 400, "answer_too_large")
    assert "stream it" in error["message"] and error["param"] == "top_logprobs"
    streamed = chat(client, keys["acme"], stream=True, **huge)
    assert streamed.status_code == 200
    assert chat(client, keys["acme"], n=2, max_tokens=64, logprobs=True, top_logprobs=5).status_code == 200
    # /v1/completions with echo: the prompt comes back with its log-probabilities, counted at the model's length.
    auth = {"Authorization": f"Bearer {keys['acme']}"}
    echoed = {"model": "orders", "prompt": ["x"] * 16, "max_tokens": 1, "logprobs": 5, "echo": True}
    assert_openai_error(client.post("/v1/completions", json=echoed, headers=auth), 400, "answer_too_large")


def test_body_over_the_limit_is_413(gateway) -> None:
    client, engine, keys = gateway
    sent = len(engine.requests)
    huge = "x" * (1 << 20)
    resp = chat(client, keys["acme"], messages=[{"role": "user", "content": huge}])
    assert_openai_error(resp, 413, "body_too_large")
    assert len(engine.requests) == sent
    # Without a Content-Length (chunked), counted as it arrives: still 413, not the parser's 400.
    headers = {"Authorization": f"Bearer {keys['acme']}", "Content-Type": "application/json"}
    payload = json.dumps({"model": "orders", "messages": [{"role": "user", "content": huge}]}).encode()
    pieces = iter([payload[i : i + 65536] for i in range(0, len(payload), 65536)])
    assert_openai_error(client.post("/v1/chat/completions", content=pieces, headers=headers), 413, "body_too_large")
    small = json.dumps({"model": "orders", "messages": [{"role": "user", "content": "hi"}]}).encode()
    resp = client.post("/v1/chat/completions", content=iter([small[:10], small[10:]]), headers=headers)
    assert resp.status_code == 200, resp.text
    assert len(engine.requests) == sent + 1


def test_each_tenant_gets_its_own_prefix_cache_salt(gateway) -> None:
    client, engine, keys = gateway
    chat(client, keys["acme"])
    chat(client, keys["other"], model="secret")
    salts = [r["cache_salt"] for r in engine.requests[-2:]]
    assert all(len(s) == 32 for s in salts) and salts[0] != salts[1]
    chat(client, keys["acme"])
    assert engine.requests[-1]["cache_salt"] == salts[0]  # stable per tenant, so its own cache still hits
    assert_openai_error(chat(client, keys["acme"], cache_salt="guess"), 400, "unsupported_parameter")


def test_text_completions_route_through_the_alias(gateway) -> None:
    client, engine, keys = gateway
    resp = client.post(
        "/v1/completions",
        json={"model": "orders", "prompt": "Order 5:", "max_tokens": 8, "response_format": {"type": "json_object"}},
        headers={"Authorization": f"Bearer {keys['acme']}"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == '{"a": 1}' and resp.headers["x-lorafleet-json"] == "valid"
    sent = engine.requests[-1]
    assert sent["model"] == "orders@2" and "chat_template" not in sent and sent["prompt"] == "Order 5:"
    no_prompt = client.post(
        "/v1/completions", json={"model": "orders"}, headers={"Authorization": f"Bearer {keys['acme']}"}
    )
    assert_openai_error(no_prompt, 422, "invalid_field")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/",
        "//v1/models",
        "/v1//models",
        "/v1/%2e%2e/v1/models",
        "/v1/models%2f",
        "/V1/models",
        "/admin/tenants/",
        "/admin//tenants",
        "/docs",
        "/openapi.json",
        "/v1/../admin/tenants",
    ],
)
def test_path_tricks_never_reach_a_route_without_auth(gateway, path: str) -> None:
    client, _, _ = gateway
    resp = client.get(path, headers={"Host": "evil.example"})
    assert resp.status_code in (401, 404), (path, resp.status_code, resp.text)
    assert "error" in resp.json()


# -- the adapter registry through the admin API ---------------------------------------------------


def adapter_files(tmp_path: Path, prefix: str = "", **kw: object) -> dict[str, bytes]:
    src = make_adapter(tmp_path / f"src-{uuid.uuid4().hex}", **kw)  # type: ignore[arg-type]
    return {f"{prefix}{p.name}": p.read_bytes() for p in src.iterdir()}


def upload(client: TestClient, alias: str, data: bytes, kind: str = "application/gzip") -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": kind}
    return client.post(f"/admin/adapters/{alias}/versions", content=data, headers=headers)


def test_publish_from_the_import_root_or_an_archive(gateway, tmp_path: Path) -> None:
    client, _, _ = gateway
    make_adapter(tmp_path / "runs" / "orders-new")
    resp = admin(client, "POST", "/adapters/orders/versions", json={"path": "orders-new"})
    assert resp.status_code == 201, resp.text
    assert resp.json()["ref"] == "orders@3"
    resp = upload(client, "orders", tar_of(adapter_files(tmp_path, prefix="adapter/")))
    assert resp.status_code == 201, resp.text
    assert resp.json()["ref"] == "orders@4"
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        for name, data in adapter_files(tmp_path).items():
            z.writestr(name, data)
    resp = upload(client, "fresh", zipped.getvalue(), "application/zip")
    assert resp.status_code == 201 and resp.json()["ref"] == "fresh@1", resp.text
    listing = {a["alias"]: a for a in admin(client, "GET", "/adapters").json()["data"]}
    assert listing["orders"]["serving"] == 4 and [v["version"] for v in listing["orders"]["versions"]] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("outside_root", 400, "outside the import root"),
        ("dotdot", 400, "'..' would escape the archive"),
        ("symlink", 400, "links and special files are refused"),
        ("pickle", 400, "pickle-format files ['adapter_model.bin'] are refused"),
        ("wrong_base", 400, "trained on m (ff), not the base"),
        ("rank", 400, "rank 64 exceeds the engine's max_lora_rank 16"),
        ("modules_to_save", 400, "has modules_to_save"),
        ("not_an_archive", 400, "not a tar or zip archive"),
        ("no_manifest", 400, "no lorafleet.json"),
        ("bad_alias", 400, "invalid alias"),
        ("content_type", 415, "Unsupported content type"),
        ("too_big", 413, "Request body too large"),
        ("name_twice", 400, "its name clashes with another member's"),
        ("file_as_folder", 400, "its name clashes with another member's"),
        ("too_many_members", 400, "more than 64 members"),
    ],
)
def test_bad_publishes_are_refused_and_leave_nothing(
    gateway, tmp_path: Path, case: str, status: int, message: str
) -> None:
    client, _, _ = gateway
    files = adapter_files(tmp_path)
    alias = "orders"
    if case == "outside_root":
        make_adapter(tmp_path / "elsewhere")
        resp = admin(client, "POST", f"/adapters/{alias}/versions", json={"path": "../elsewhere"})
    elif case == "dotdot":
        resp = upload(client, alias, tar_of({**files, "../evil.txt": b"x"}))
    elif case == "symlink":
        resp = upload(client, alias, tar_of(files, link="passwd"))
    elif case == "pickle":
        resp = upload(client, alias, tar_of({**files, "adapter_model.bin": b"\x80\x04evil"}))
    elif case == "wrong_base":  # the served base's name, other weights (a base no engine serves is only a warning)
        resp = upload(client, alias, tar_of(adapter_files(tmp_path, base_sha256="ff")))
    elif case == "rank":
        resp = upload(client, alias, tar_of(adapter_files(tmp_path, rank=64)))
    elif case == "modules_to_save":
        resp = upload(client, alias, tar_of(adapter_files(tmp_path, modules_to_save=["lm_head"])))
    elif case == "not_an_archive":
        resp = upload(client, alias, b"just some bytes")
    elif case == "no_manifest":
        resp = upload(client, alias, tar_of({k: v for k, v in files.items() if k != "lorafleet.json"}))
    elif case == "bad_alias":
        resp = upload(client, "Bad Alias", tar_of(files))
    elif case == "content_type":
        resp = upload(client, alias, tar_of(files), kind="text/plain")
    elif case in ("name_twice", "file_as_folder", "too_many_members"):
        extra = {
            "name_twice": [("lorafleet.json", b"{}")],
            "file_as_folder": [("notes", b"x"), ("notes/a", b"y")],
            "too_many_members": [(f"f{i}", b"") for i in range(70)],
        }[case]
        resp = upload(client, alias, _tar_members([*files.items(), *extra]))
    else:
        resp = upload(client, alias, b"\0" * (256 << 20 | 1))
    error = assert_openai_error(resp, status)
    assert message in error["message"], error
    store = client.app.state.gateway.adapters.store  # type: ignore[attr-defined]
    assert [v.version for v in store.versions("orders")] == [1, 2]
    assert not any((store.root / ".staging").iterdir()) if (store.root / ".staging").is_dir() else True


def _tar_members(members: list[tuple[str, bytes]]) -> bytes:
    """A tar with these members in this order, duplicates included (``tar_of`` takes a dict)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_promote_needs_a_passing_gate_and_rollback_and_retire_drain(gateway) -> None:
    client, engine, keys = gateway
    store = client.app.state.gateway.adapters.store  # type: ignore[attr-defined]
    error = assert_openai_error(admin(client, "POST", "/adapters/orders/promote", json={"version": 1}), 400)
    assert "orders@1 has no evaluation gate verdict" in error["message"]
    store.record_gate(store.get("orders", 1), {"passed": True})
    event = admin(client, "POST", "/adapters/orders/promote", json={"version": 1}).json()
    assert event["action"] == "promote" and event["loaded"] and event["actor"] == "admin-api"
    assert chat(client, keys["acme"]).headers["x-lorafleet-adapter"] == "orders@1"  # stable now, not the newest
    forced = admin(client, "POST", "/adapters/orders/promote", json={"version": 2, "force": True, "reason": "hotfix"})
    assert forced.json()["forced"] and chat(client, keys["acme"]).headers["x-lorafleet-adapter"] == "orders@2"
    assert_openai_error(admin(client, "DELETE", "/adapters/orders/versions/2"), 400, "adapter_refused")  # stable
    assert_openai_error(admin(client, "POST", "/adapters/orders/promote", json={"version": 9, "force": True}), 404)

    # Retiring orders@1 while a request on it is in flight: unloaded only after that request ends.
    registry = client.app.state.gateway.adapters  # type: ignore[attr-defined]
    release = registry.lease(store.get("orders", 1))
    retired = admin(client, "DELETE", "/adapters/orders/versions/1").json()
    assert retired["action"] == "retire" and retired["draining_requests"] == 1
    assert "orders@1" in engine.loaded
    client.portal.call(_release_on_loop, release)  # type: ignore[attr-defined]
    assert "orders@1" not in engine.loaded and "orders@2" in engine.loaded
    assert [e["action"] for e in store.events("orders")] == ["promote", "promote", "retire"]


async def _release_on_loop(release: Callable[[], None]) -> None:
    release()
    await asyncio.sleep(0.05)  # let the scheduled unload run


def _deep(n: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(n):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"pattern": "^(a+)+$"}, "nests quantifiers"),
        ({"patternProperties": {"(x|xx)*y": {}}}, "nests quantifiers"),
        ({"pattern": "(unclosed"}, "does not compile"),
        ({"pattern": "^(?=.*[0-9])[a-z0-9]+$"}, "lookarounds and backreferences are not supported"),
        ({"pattern": "^(a)\\1$"}, "RE2"),
        ({"patternProperties": {"^x": {}}, "unevaluatedProperties": False}, "use 'additionalProperties'"),
        ({"pattern": "a" * 600}, "a pattern of 600 characters"),
        (_deep(40), "nested deeper than 32 levels"),
        ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1200)}}, "1200 properties"),
        ({"type": "object", "description": "x" * 70000}, "bytes; the limit is 65536"),
        ({"type": 12}, "not a valid JSON Schema"),
        ("not an object", "must be a JSON object"),
    ],
)
def test_hostile_client_schemas_are_refused_before_the_engine(gateway, schema: object, message: str) -> None:
    client, engine, keys = gateway
    sent = len(engine.requests)
    fmt = {"type": "json_schema", "json_schema": {"name": "h", "schema": schema}}
    error = assert_openai_error(chat(client, keys["acme"], response_format=fmt), 400, "schema_refused")
    assert message in error["message"] and error["param"] == "response_format"
    assert len(engine.requests) == sent


def test_show_a_version(gateway) -> None:
    client, _, _ = gateway
    shown = admin(client, "GET", "/adapters/orders/versions/2")
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert body["ref"] == "orders@2" and body["serving"] is True and body["stable"] is False
    assert body["loaded"] is True and body["retired"] is False and body["manifest"]["lora"]["rank"] == 8
    assert "chat_template" not in body["manifest"]["prompt_format"]
    assert_openai_error(admin(client, "GET", "/adapters/orders/versions/99"), 404, "adapter_not_found")


def test_keys_and_policies_are_cached_and_every_change_shows(tmp_path: Path) -> None:
    """The gateway reads a key's tenant and an alias's policy once per ``cache_s``; its own writes (the admin
    API) clear that at once, and a write from another process (the CLI) shows once ``cache_s`` has passed."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    gateway, cli = TenantStore(url, cache_s=0.2), TenantStore(url)
    queries: list[str] = []
    sa.event.listen(gateway.engine, "before_cursor_execute", lambda *args: queries.append(args[2]))
    acme = cli.create("acme")
    key = cli.issue_key(acme)  # issued elsewhere (a new random key was never seen, so never cached as bogus)
    assert gateway.authenticate(key) == cli.get("acme")
    queries.clear()
    assert gateway.authenticate(key) is not None and queries == []  # from memory
    gateway.grant(acme, "orders")  # a write through the gateway's own store applies at once
    assert gateway.authenticate(key).aliases == {"orders"}
    cli.revoke_key(acme, key_id_of(key))  # another process: shows within cache_s
    time.sleep(0.25)
    assert gateway.authenticate(key) is None
    key2 = cli.issue_key(acme)
    assert gateway.authenticate(key2) is not None
    gateway.set_disabled("acme", True)
    assert gateway.authenticate(key2) is None

    policies, other = AliasPolicies(gateway.engine, cache_s=0.2), AliasPolicies(cli.engine)
    assert policies.get("orders") == AliasPolicy()
    queries.clear()
    assert policies.get("orders") == AliasPolicy() and queries == []
    policies.set("orders", AliasPolicy(json_mode="enforce"))
    assert policies.get("orders").json_mode == "enforce"
    other.set("orders", AliasPolicy(json_mode="off"))
    time.sleep(0.25)
    assert policies.get("orders").json_mode == "off"


def test_the_event_loop_never_waits_on_the_database_for_a_key(tmp_path: Path) -> None:
    """Known keys from memory; a stale one answered at once and read again behind the answer; a bogus one read
    once, then refused from memory (a flood of made-up keys is not a flood of database reads)."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    gateway, cli = TenantStore(url, cache_s=0.2), TenantStore(url)
    reads: list[str] = []
    sa.event.listen(gateway.engine, "before_cursor_execute", lambda *args: reads.append(args[2]))
    acme = cli.create("acme")
    key = cli.issue_key(acme)

    async def scenario() -> None:
        assert (await gateway.aauthenticate(key)) == cli.get("acme")
        reads.clear()
        assert await gateway.aauthenticate(key) is not None and reads == []  # fresh: from memory
        cli.revoke_key(acme, key_id_of(key))  # elsewhere
        await asyncio.sleep(0.25)  # stale now
        assert await gateway.aauthenticate(key) is not None  # answered at once, read again behind the answer
        await asyncio.sleep(0.2)
        assert await gateway.aauthenticate(key) is None  # the read found the revocation
        reads.clear()
        bogus = "lf-" + "x" * 43
        for _ in range(50):
            assert await gateway.aauthenticate(bogus) is None
        assert len([q for q in reads if "api_keys" in q]) == 1  # one database read for fifty attempts

    asyncio.run(scenario())


def test_the_engine_child_runs_at_lower_priority_in_its_own_session_and_autogroup() -> None:
    """``LORAFLEET_ENGINE_NICE`` must reach the scheduler: the child's niceness and, where the kernel groups
    sessions (autogroups share the CPU as equals whatever their tasks' niceness), its session's group too."""
    import os
    import subprocess
    import sys

    from serving.engines.vllm import child_setup

    probe = (
        "import os, pathlib; p = pathlib.Path('/proc/self/autogroup');"
        "print(os.getsid(0) == os.getpid(), os.nice(0), p.read_text().split()[-1] if p.exists() else '-')"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], preexec_fn=child_setup(7), capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "True"  # its own session: a stop signals the whole vLLM process group
    assert int(out[1]) == os.nice(0) + 7 or int(out[1]) == 19
    if out[2] != "-":  # a kernel with scheduler autogroups
        assert int(out[2]) == 7


def one_tenant(tmp_path: Path) -> tuple[GatewaySettings, str]:
    """Settings over ``tmp_path`` with one adapter (``orders``) and one tenant granted it; the tenant's key."""
    settings = GatewaySettings(data_dir=tmp_path, base_model=str(fake_base(tmp_path)), admin_key=ADMIN_KEY)
    AdapterStore(settings.adapters_dir).publish(make_adapter(tmp_path / "src"), "orders")
    tenants = TenantStore(settings.state_url)
    acme = tenants.create("acme")
    tenants.grant(acme, "orders")
    key = tenants.issue_key(acme)
    return settings, key


def test_an_unexpected_failure_is_a_500_in_openais_shape(tmp_path: Path) -> None:
    settings, key = one_tenant(tmp_path)

    class BrokenEngine(FakeEngine):
        async def send(self, *args: object, **kw: object) -> httpx.Response:
            raise RuntimeError("a bug, with internals nobody should see")

    with TestClient(build_app(settings, engine=BrokenEngine()), raise_server_exceptions=False) as client:
        resp = chat(client, key)
    error = assert_openai_error(resp, 500, "internal_error")
    assert error["type"] == "server_error" and "internals" not in error["message"]


def test_the_sqlite_state_database_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    tenants = TenantStore(f"sqlite:///{tmp_path / 'state.db'}")
    with tenants.engine.connect() as db:
        assert db.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert db.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_a_stream_that_breaks_off_ends_with_an_error_event_and_done(tmp_path: Path) -> None:
    from serving.engines.protocol import EngineError

    settings, key = one_tenant(tmp_path)

    class Broken:
        status_code = 200

        async def aiter_bytes(self):  # type: ignore[no-untyped-def]
            yield b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"{\\"a\\""}}]}\n\n'
            raise EngineError("engine connection lost")

        async def aread(self) -> bytes:
            return b""

        async def aclose(self) -> None:
            return None

    class BreakingEngine(FakeEngine):
        async def send(self, *args: object, **kw: object) -> Broken:  # type: ignore[override]
            return Broken()

    with TestClient(build_app(settings, engine=BreakingEngine())) as client:
        resp = chat(client, key, stream=True)
    assert resp.status_code == 200
    events = [e for e in resp.text.split("\n\n") if e.strip()]
    assert events[0].startswith('data: {"id":"c1"')
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_stream_broken" and error["type"] == "server_error"
    assert events[-1] == "data: [DONE]"


def test_a_promotion_from_a_stale_view_is_409(gateway) -> None:
    client, _, _ = gateway
    promoted = admin(
        client, "POST", "/adapters/orders/promote", json={"version": 1, "force": True, "expected_stable": 2}
    )
    error = assert_openai_error(promoted, 409, "alias_changed")
    assert "no stable version" in error["message"] and "retry" in error["message"]
    ok = admin(client, "POST", "/adapters/orders/promote", json={"version": 1, "force": True, "expected_stable": None})
    assert ok.status_code == 200, ok.text


def test_a_retired_version_stays_while_the_engine_runs_other_gateways_requests_for_it(gateway) -> None:
    client, engine, _ = gateway
    for version in (1, 2):  # 1 is loaded while stable, then replaced
        assert admin(client, "POST", "/adapters/orders/promote", json={"version": version, "force": True}).is_success
    info = 'vllm:lora_requests_info{{max_lora="4",running_lora_adapters="{}",waiting_lora_adapters=""}} 1.8e9\n'
    engine.exposition = info.format("orders@1").encode()  # another gateway's request runs on orders@1 there
    retired = admin(client, "DELETE", "/adapters/orders/versions/1").json()
    assert retired["draining_requests"] == 0  # none of this gateway's own
    time.sleep(1.5)
    assert "orders@1" in engine.loaded
    engine.exposition = info.format("").encode()  # that request ended
    deadline = time.monotonic() + 5
    while "orders@1" in engine.loaded and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "orders@1" not in engine.loaded and "orders@2" in engine.loaded


def test_tokens_per_minute_are_charged_with_what_requests_used(gateway) -> None:
    client, _, keys = gateway
    patched = admin(client, "PATCH", "/tenants/acme", json={"limits": {"tokens_per_minute": 20}})
    assert patched.json()["limits"]["tokens_per_minute"] == 20
    # The fake engine reports 5 prompt + 3 completion tokens: 8 a request; the third overdraws the 20.
    assert [chat(client, keys["acme"]).status_code for _ in range(3)] == [200, 200, 200]
    refused = chat(client, keys["acme"])
    error = assert_openai_error(refused, 429, "token_rate_limit_exceeded")
    assert "20 tokens per minute" in error["message"] and 1 <= int(refused.headers["Retry-After"]) <= 15
    assert chat(client, keys["other"], model="secret").status_code == 200  # another tenant is not charged
