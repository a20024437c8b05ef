"""The gateway's metrics, request ids and access log, against the fake engine."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from contract.store import AdapterStore
from serving.app import build_app
from serving.config import GatewaySettings
from serving.state.tenants import TenantStore
from tests.conftest import make_adapter
from tests.fakes import ADMIN_KEY, FakeEngine, chat, fake_base

SERIES_CAP = 400  # what 1,000 bogus aliases and keys must not push the exposition past


@pytest.fixture
def setup(tmp_path: Path) -> tuple[GatewaySettings, dict[str, str]]:
    return gateway_setup(tmp_path)


def gateway_setup(tmp_path: Path) -> tuple[GatewaySettings, dict[str, str]]:
    """Settings over a fake base, the ``orders`` adapter with a schema, and three tenants' keys."""
    settings = GatewaySettings(data_dir=tmp_path, base_model=str(fake_base(tmp_path)), admin_key=ADMIN_KEY)
    store = AdapterStore(settings.adapters_dir)
    schema = {"type": "object", "required": ["a"]}
    adapter = make_adapter(tmp_path / "orders")
    manifest = json.loads((adapter / "lorafleet.json").read_text()) | {"output_schema": schema}
    (adapter / "lorafleet.json").write_text(json.dumps(manifest))
    store.publish(adapter, "orders")
    tenants = TenantStore(settings.state_url)
    keys = {}
    for name in ("acme", "beta", "gamma"):
        tenant = tenants.create(name)
        tenants.grant(tenant, "orders")
        keys[name] = tenants.issue_key(tenant)
    return settings, keys


def open_gateway(settings: GatewaySettings) -> Iterator[tuple[TestClient, FakeEngine]]:
    engine = FakeEngine()
    with TestClient(build_app(settings, engine=engine)) as client:
        yield client, engine


@pytest.fixture
def gw(setup) -> Iterator[tuple[TestClient, FakeEngine, dict[str, str]]]:
    settings, keys = setup
    for client, engine in open_gateway(settings):
        yield client, engine, keys


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


ORDERS = {"alias": "orders", "version": "1", "variant": "stable"}


def test_a_routed_request_is_counted_timed_and_judged(gw) -> None:
    client, _, keys = gw
    assert chat(client, keys["acme"]).status_code == 200
    m = scrape(client)
    assert value(m, "lorafleet_requests_total", **ORDERS, status_class="2xx") == 1
    assert value(m, "lorafleet_request_duration_seconds_count", **ORDERS) == 1
    assert value(m, "lorafleet_json_checks_total", **ORDERS, mode="validate", outcome="valid") == 1
    assert value(m, "lorafleet_prompt_tokens_total", **ORDERS) == 5
    assert value(m, "lorafleet_generation_tokens_total", **ORDERS) == 3
    assert value(m, "lorafleet_http_responses_total", route="/v1/chat/completions", status_class="2xx") == 1
    assert value(m, "lorafleet_engine_up") == 1 and value(m, "lorafleet_adapters_active") == 1
    assert value(m, "lorafleet_adapter_loads_total", outcome="success") == 1
    assert value(m, "lorafleet_adapter_load_duration_seconds_count") == 1


def test_a_stream_gives_time_to_first_token_and_tokens_without_showing_usage_unasked(gw) -> None:
    client, engine, keys = gw
    engine.answer = '{"b": 2}'
    resp = chat(client, keys["acme"], stream=True)
    assert engine.requests[-1]["stream_options"] == {"include_usage": True}  # asked upstream for the counts...
    assert '"usage"' not in resp.text  # ...and not passed on to a client that did not ask
    asked = chat(client, keys["acme"], stream=True, stream_options={"include_usage": True})
    assert '"usage":{"prompt_tokens":5' in asked.text
    m = scrape(client)
    assert value(m, "lorafleet_time_to_first_token_seconds_count", **ORDERS) == 2
    assert value(m, "lorafleet_time_per_output_token_seconds_count", **ORDERS) == 2
    assert value(m, "lorafleet_generation_tokens_total", **ORDERS) == 6
    assert value(m, "lorafleet_json_checks_total", **ORDERS, mode="validate", outcome="schema_mismatch") == 2


@pytest.mark.parametrize(
    ("send", "reason"),
    [
        (lambda c, k: chat(c, "lf-wrong"), "auth"),
        (lambda c, k: chat(c, k, model="nope"), "not_found"),
        (lambda c, k: chat(c, k, messages=[{"role": "user", "content": "x" * (2 << 20)}]), "too_large"),
        (
            lambda c, k: chat(c, k, response_format={"type": "json_schema", "json_schema": {"schema": {"type": 1}}}),
            "schema",
        ),
        (lambda c, k: chat(c, k, n=500), "invalid_request"),
        (lambda c, k: c.get("/v1/nothing-here"), "not_found"),
    ],
)
def test_refusals_are_counted_by_reason(gw, send, reason: str) -> None:
    client, _, keys = gw
    resp = send(client, keys["acme"])
    assert resp.status_code >= 400
    m = scrape(client)
    assert value(m, "lorafleet_rejections_total", reason=reason) == 1
    assert sum(v for (name, _), v in m.items() if name == "lorafleet_rejections_total") == 1
    assert not any(name == "lorafleet_requests_total" for name, _ in m)  # nothing was routed


def test_rate_limited_requests_are_counted(gw) -> None:
    client, _, keys = gw
    client.patch(
        "/admin/tenants/acme",
        json={"limits": {"requests_per_minute": 1}},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert chat(client, keys["acme"]).status_code == 200
    assert chat(client, keys["acme"]).status_code == 429
    assert value(scrape(client), "lorafleet_rejections_total", reason="limit") == 1


def test_a_thousand_bogus_aliases_and_keys_do_not_grow_the_series(gw) -> None:
    client, _, keys = gw
    for i in range(1000):
        chat(client, keys["acme"], model=f"bogus-{i}")
        chat(client, f"lf-bogus-{i}", model=f"bogus-{i}")
        client.post(f"/v1/bogus/{i}", json={})
    body = client.get("/metrics").text
    assert "bogus" not in body
    series = [line for line in body.splitlines() if line and not line.startswith("#")]
    assert len(series) < SERIES_CAP, len(series)
    m = scrape(client)
    assert value(m, "lorafleet_rejections_total", reason="not_found") == 2000
    assert value(m, "lorafleet_rejections_total", reason="auth") == 1000


def test_tenant_label_is_opt_in_and_capped(setup) -> None:
    settings, keys = setup
    for client, _ in open_gateway(settings):
        chat(client, keys["acme"])
        assert not any(name.startswith("lorafleet_tenant") for name, _ in scrape(client))
    capped = settings.model_copy(update={"metrics_tenant_label": True, "metrics_max_tenants": 2})
    for client, _ in open_gateway(capped):
        for name in ("acme", "beta", "gamma", "gamma"):
            chat(client, keys[name])
        m = scrape(client)
        assert value(m, "lorafleet_tenant_requests_total", tenant="acme", status_class="2xx") == 1
        assert value(m, "lorafleet_tenant_requests_total", tenant="beta", status_class="2xx") == 1
        assert value(m, "lorafleet_tenant_requests_total", tenant="other", status_class="2xx") == 2


def test_metrics_key_guards_the_scrape(setup) -> None:
    settings, _ = setup
    guarded = settings.model_copy(update={"metrics_key": SecretStr("scrape-secret")})
    for client, _ in open_gateway(guarded):
        assert client.get("/metrics").status_code == 401
        ok = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert ok.status_code == 200 and "lorafleet_engine_up" in ok.text


def test_request_ids_are_kept_or_made_and_passed_upstream(gw) -> None:
    client, engine, keys = gw

    def send(request_id: str) -> str:
        body = {"model": "orders", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {keys['acme']}", "X-Request-ID": request_id}
        return str(client.post("/v1/chat/completions", json=body, headers=headers).headers["x-request-id"])

    # The engine gets the gateway's own id (unique: two tenants sending the same id never collide there),
    # which ends with the client's for tracing; the client's id comes back in the header.
    assert send("trace-42") == "trace-42"
    first = engine.request_ids[-1]
    assert send("trace-42") == "trace-42" and engine.request_ids[-1] != first
    assert re.fullmatch(r"gw[0-9a-f]{12}-trace-42", first)
    made = send("bad id with spaces")
    assert made != "bad id with spaces" and len(made) == 32 and engine.request_ids[-1].endswith("-" + made)
    assert chat(client, "lf-wrong").headers["x-request-id"]  # errors carry one too


def test_access_log_is_one_json_line_without_content(gw, caplog: pytest.LogCaptureFixture) -> None:
    client, _, keys = gw
    caplog.set_level(logging.INFO, logger="lorafleet.access")
    chat(client, keys["acme"], stream=True)
    chat(client, keys["acme"], messages=[{"role": "user", "content": "my secret prompt"}])
    chat(client, "lf-wrong")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "lorafleet.access"]
    streamed, ok, refused = lines[-3], lines[-2], lines[-1]
    # the gateway's own time, then the engine's to its first event: together the stream's time to first token
    # (the engine's share starts once the gateway's client has written the request: its send is the gateway's)
    assert streamed["gateway_s"] > 0 and streamed["upstream_send_s"] >= 0 and streamed["engine_ttft_s"] > 0
    parts = streamed["gateway_s"] + streamed["upstream_send_s"] + streamed["engine_ttft_s"]
    assert parts == pytest.approx(streamed["ttft_s"], abs=3e-4)
    # then relaying that first event to the client: handed to its connection before the stream ended
    assert streamed["relay_first_s"] >= 0 and streamed["ttft_s"] + streamed["relay_first_s"] <= streamed["latency_s"]
    assert ok["engine_ttft_s"] is None and ok["relay_first_s"] is None  # not a stream: no first event
    assert ok["tenant"] == "acme" and ok["alias"] == "orders" and ok["version"] == 1 and ok["variant"] == "stable"
    assert ok["status"] == 200 and ok["latency_s"] > 0 and ok["completion_tokens"] == 3
    assert ok["json_outcome"] == "valid" and ok["json_mode"] == "validate" and len(ok["request_id"]) == 32
    assert refused["status"] == 401 and refused["rejection"] == "auth" and refused["tenant"] is None
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "my secret prompt" not in text and '{"a": 1}' not in text and keys["acme"] not in text


def test_content_logging_is_an_explicit_switch(setup, caplog: pytest.LogCaptureFixture) -> None:
    settings, keys = setup
    caplog.set_level(logging.INFO, logger="lorafleet.access")
    for client, _ in open_gateway(settings.model_copy(update={"log_content": True})):
        chat(client, keys["acme"], messages=[{"role": "user", "content": "debug this prompt"}])
    entry = json.loads([r for r in caplog.records if r.name == "lorafleet.access"][-1].getMessage())
    assert "debug this prompt" in entry["request"] and '{\\"a\\": 1}' in entry["response"]


def test_the_engine_metrics_are_relayed_and_guarded_alike(setup) -> None:
    settings, _ = setup
    for client, engine in open_gateway(settings.model_copy(update={"metrics_key": SecretStr("scrape-secret")})):
        assert client.get("/metrics/engine").status_code == 401
        auth = {"Authorization": "Bearer scrape-secret"}
        resp = client.get("/metrics/engine", headers=auth)
        assert resp.status_code == 200 and "vllm:num_requests_running" in resp.text
        engine.ready = False
        down = client.get("/metrics/engine", headers=auth)
        assert down.status_code == 503 and down.headers["retry-after"]
