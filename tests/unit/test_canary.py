"""Canary rollouts against the fake engine: the analysis, assignment, decisions, the admin API and restarts."""

from __future__ import annotations

import copy
import functools
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from contract.store import AdapterStore
from serving.app import build_app
from serving.canary.analysis import CanaryConfig, Window, analyze, user_point
from serving.canary.state import CanaryError
from serving.config import GatewaySettings
from serving.records import RequestRecord
from serving.state.canaries import CanaryRecords
from serving.state.tenants import TenantStore
from tests.conftest import make_adapter
from tests.fakes import ADMIN_KEY, FakeEngine, assert_openai_error, fake_base

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SCHEMA = {"type": "object", "required": ["a"]}


# -- the analysis, on its own -------------------------------------------------------------------------


def window(
    n: int,
    *,
    valid: int | None = None,
    errors: int = 0,
    latency: float = 1.0,
    streams: int = 0,
    tokens: int = 20,
    outcome: str = "invalid_json",
    client_max_tokens: bool = False,
    judged: bool = True,
) -> Window:
    rng = random.Random(n * 7 + errors)
    w = Window()
    for i in range(n):
        record = RequestRecord(str(i), "POST", "/v1/chat/completions")
        record.status = 500 if i < errors else 200
        record.started, record.finished = 0.0, latency * tokens / 20 * rng.uniform(0.9, 1.1)
        record.completion_tokens, record.client_max_tokens = tokens, client_max_tokens
        if i < streams:
            record.stream, record.first_token = True, 0.1 * latency
        record.json_outcomes = ["valid" if valid is None or i < valid else outcome]
        record.json_judged = judged
        w.add(record)
    return w


CONFIG = CanaryConfig(min_samples=50, max_validity_drop=0.02, max_error_increase=0.01, max_latency_ratio=1.5)


def test_too_few_samples_means_wait_and_says_so() -> None:
    result = analyze(window(60), window(20), CONFIG)
    assert result.decision == "wait" and "canary 20, need 50 each" in result.reason


def test_equal_variants_pass() -> None:
    result = analyze(window(200, valid=198), window(200, valid=197), CONFIG)
    assert result.decision == "pass", result
    assert {m["metric"] for m in result.metrics} == {"json_validity", "success_rate", "time_per_token", "ttft"}
    ttft = next(m for m in result.metrics if m["metric"] == "ttft")
    assert "not judged" in ttft["note"]  # no streams: TTFT is not compared, and that is said


def test_a_validity_drop_beyond_the_margin_rolls_back() -> None:
    result = analyze(window(200, valid=199), window(200, valid=150), CONFIG)
    assert result.decision == "rollback" and "json_validity" in result.reason
    validity = next(m for m in result.metrics if m["metric"] == "json_validity")
    assert validity["stable"] == pytest.approx(0.995) and validity["canary"] == 0.75 and validity["p_value"] < 0.05


def test_a_drop_inside_the_margin_is_tolerated() -> None:
    assert analyze(window(200, valid=200), window(200, valid=198), CONFIG).decision == "pass"


def test_more_server_errors_roll_back() -> None:
    result = analyze(window(200), window(200, errors=20), CONFIG)
    assert result.decision == "rollback" and "success_rate" in result.reason


def test_slower_latency_beyond_the_ratio_rolls_back_and_within_it_passes() -> None:
    slow = analyze(window(100, streams=100), window(100, latency=2.0, streams=100), CONFIG)
    assert slow.decision == "rollback" and "time_per_token" in slow.reason and "ttft" in slow.reason
    assert analyze(window(100), window(100, latency=1.2), CONFIG).decision == "pass"


def test_a_client_cannot_steer_the_canary_with_its_own_max_tokens() -> None:
    # Every canary answer cut by the client's max_tokens=1: not invalid JSON, counted apart...
    cut = window(200, valid=0, outcome="truncated", client_max_tokens=True, tokens=1, latency=0.1)
    result = analyze(window(200, valid=199), cut, CONFIG)
    assert cut.checked == 0 and cut.cut_by_client == 200 and result.decision == "wait"  # no JSON verdicts to judge
    # ...and short answers are not "faster", nor long ones "slower": latency is per output token.
    long_answers = window(200, valid=199, tokens=200, latency=1.0)  # 10x the tokens, 10x the time
    assert analyze(window(200, valid=199), long_answers, CONFIG).decision == "pass"
    # An answer the adapter itself let run to the gateway's limit is still a failure of the adapter.
    rambling = window(200, valid=0, outcome="truncated")
    assert analyze(window(200, valid=199), rambling, CONFIG).decision == "rollback"


def test_a_client_cannot_steer_the_canary_with_schemas_of_its_own() -> None:
    """Answers to a schema (or a JSON mode) the client chose are not the version's validity: sending unsatisfiable
    schemas from users on one arm rolls nothing back (and could have forced a rollback before)."""
    steered = window(200, valid=0, outcome="schema_mismatch", judged=False)
    assert steered.checked == 0
    assert window(200, errors=100, judged=False).errors == 0  # the engine failing on the client's own schema
    result = analyze(window(200, valid=199), steered, CONFIG)
    assert result.decision == "wait" and "JSON-checked" in result.reason  # no verdict of its own yet: no decision
    assert analyze(window(200, valid=199), window(200, valid=0, outcome="schema_mismatch"), CONFIG).decision == (
        "rollback"
    )  # the alias's own schema failing is still the version's failure


def test_only_the_aliases_own_schema_and_mode_are_judged(gw) -> None:
    client, _, key = gw
    records: list[RequestRecord] = []
    state = client.app.state.gateway  # type: ignore[attr-defined]
    state.canaries.observe = lambda canary_id, variant, record: records.append(record)
    assert start(client, steps=[50, 100]).status_code == 201
    own = {"model": "orders", "messages": [{"role": "user", "content": "hi"}], "user": "u1"}
    theirs = own | {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}}
    mode = own | {"lorafleet": {"json_mode": "validate"}}
    for body in (own, theirs, mode):
        assert client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}).is_success
    assert [r.json_judged for r in records] == [True, False, False]


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": [50, 10]},
        {"steps": [0, 50]},
        {"steps": [5, 150]},
        {"steps": []},
        {"confidence": 1.0},
        {"max_latency_ratio": 0.5},
        {"max_validity_drop": -0.1},
        {"min_samples": 0},
        {"interval_s": 0},
    ],
)
def test_config_out_of_range_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        CanaryConfig.model_validate(bad)


def test_user_points_are_deterministic_and_uniform() -> None:
    assert user_point(1, "user:a") == user_point(1, "user:a") != user_point(2, "user:a")
    points = [user_point(7, f"user:{i}") for i in range(4000)]
    assert 0.47 < sum(p < 0.5 for p in points) / len(points) < 0.53


# -- through the gateway ------------------------------------------------------------------------------


@pytest.fixture
def setup(tmp_path: Path) -> tuple[GatewaySettings, str]:
    # The analysis loop is driven by hand here (tick), so the tests do not wait on a clock.
    settings = GatewaySettings(
        data_dir=tmp_path, base_model=str(fake_base(tmp_path)), admin_key=ADMIN_KEY, canary_poll_s=3600
    )
    store = AdapterStore(settings.adapters_dir)
    for i in range(1, 5):
        adapter = make_adapter(tmp_path / f"v{i}")
        manifest = json.loads((adapter / "lorafleet.json").read_text()) | {"output_schema": SCHEMA}
        (adapter / "lorafleet.json").write_text(json.dumps(manifest))
        store.publish(adapter, "orders")
    store.record_gate(store.get("orders", 1), {"passed": True})
    store.promote("orders", 1)
    store.record_gate(store.get("orders", 2), {"passed": True})  # v3: no gate; v4: failed it
    store.record_gate(store.get("orders", 4), {"passed": False})
    tenants = TenantStore(settings.state_url)
    tenant = tenants.create("acme")
    tenants.grant(tenant, "orders")
    return settings, tenants.issue_key(tenant)


@pytest.fixture
def gw(setup) -> Iterator[tuple[TestClient, FakeEngine, str]]:
    settings, key = setup
    engine = FakeEngine()
    with TestClient(build_app(settings, engine=engine)) as client:
        yield client, engine, key


def send(client: TestClient, key: str, user: str) -> httpx.Response:
    body = {"model": "orders", "messages": [{"role": "user", "content": "hi"}], "user": user}
    resp = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    return resp


def variant(resp: httpx.Response) -> str:
    """Which arm served: the candidate is orders@2 in these tests (the client is told the version, not the arm)."""
    return "canary" if resp.headers["x-lorafleet-adapter"] == "orders@2" else "stable"


def start(client: TestClient, **body: object) -> httpx.Response:
    return client.post("/admin/canaries/orders", json={"version": 2} | body, headers=ADMIN)


def tick(client: TestClient, ahead_s: float = 3600) -> None:
    """One analysis, as if the interval had passed."""
    canaries = client.app.state.gateway.canaries  # type: ignore[attr-defined]
    client.portal.call(canaries.tick, time.time() + ahead_s)  # type: ignore[union-attr]


def status(client: TestClient) -> dict:
    resp = client.get("/admin/canaries/orders", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_assignment_is_sticky_per_user_and_follows_the_weight(gw) -> None:
    client, _, key = gw
    assert start(client, steps=[30, 100]).status_code == 201
    seen: dict[str, set[str]] = {}
    for i in range(150):
        for _ in range(2):
            resp = send(client, key, f"u{i}")
            seen.setdefault(f"u{i}", set()).add(variant(resp))
            assert "x-lorafleet-variant" not in resp.headers  # the arm is not the client's to know
    assert all(len(v) == 1 for v in seen.values())  # one user, one version through the step
    share = sum("canary" in v for v in seen.values()) / len(seen)
    assert 0.18 < share < 0.42, share
    body = {"model": "orders", "messages": [{"role": "user", "content": "x"}]}
    headers = {"Authorization": f"Bearer {key}", "X-Lorafleet-User": "u7"}
    header_user = client.post("/v1/chat/completions", json=body, headers=headers)
    assert {variant(header_user)} == seen["u7"]
    assert 'lorafleet_canary_weight{alias="orders"} 0.3' in client.get("/metrics").text


def test_a_tenant_cannot_pile_its_requests_into_the_canary_with_chosen_user_keys(gw) -> None:
    client, _, key = gw
    assert start(client, steps=[10, 100]).status_code == 201
    canary_id = status(client)["id"]
    # user keys whose point (within this tenant) falls in the 10% canary arm: every request would go there
    tenant_id = client.app.state.gateway.tenants.get("acme").id  # type: ignore[attr-defined]
    chosen = [u for u in (f"probe{i}" for i in range(2000)) if user_point(canary_id, f"{tenant_id}:user:{u}") < 0.1]
    variants = [variant(send(client, key, chosen[i % len(chosen)])) for i in range(300)]
    share = variants.count("canary") / len(variants)
    assert share < 0.1 + 0.05 + 4 * (0.1 * 0.9 / 300) ** 0.5 + 0.02, share  # the cap, not 100%
    assert variants[:20] == ["canary"] * 20  # sticky until the tenant's share goes beyond it


def test_a_good_candidate_is_promoted_through_every_step(gw) -> None:
    client, _, key = gw
    # Latency is not what this test is about: in-process timings of a fake engine are noise, and a noisy
    # latency comparison could roll back a good candidate on a busy machine.
    assert start(client, steps=[20, 50, 100], min_samples=10, max_latency_ratio=100).status_code == 201
    weights = []
    while status(client)["state"] == "running" and len(weights) < 5:
        weights.append(status(client)["weight"])
        for i in range(80):
            send(client, key, f"user-{i}")
        tick(client)
    final = status(client)
    assert weights == [0.2, 0.5]  # reaching 100% is the promotion
    assert final["state"] == "promoted" and final["weight"] == 0
    store = client.app.state.gateway.adapters.store  # type: ignore[attr-defined]
    assert store.stable("orders").version == 2 and store.is_retired(store.get("orders", 1))
    events = client.get("/admin/canaries/orders/events", headers=ADMIN).json()["data"]
    assert [e["action"] for e in events] == ["start", "step", "promote"]
    assert events[1]["numbers"]["analysis"]["decision"] == "pass" and events[1]["reason"].endswith("20% -> 50%")
    assert store.events("orders")[-1]["actor"] == "canary"  # the store's own audit trail says who moved it
    assert send(client, key, "anyone").headers["x-lorafleet-adapter"] == "orders@2"
    assert 'lorafleet_canary_decisions_total{alias="orders",outcome="promote"} 1.0' in client.get("/metrics").text


def test_a_bad_candidate_is_rolled_back_and_stable_keeps_serving(gw) -> None:
    client, engine, key = gw
    engine.answers["orders@2"] = '{"a": '  # broken JSON from the candidate
    assert start(client, steps=[50, 100], min_samples=10).status_code == 201
    for i in range(60):
        send(client, key, f"user-{i}")  # every request answered (200) throughout
    tick(client)
    final = status(client)
    assert final["state"] == "rolled_back", final
    validity = next(m for m in final["last_analysis"]["metrics"] if m["metric"] == "json_validity")
    assert validity["regression"] and validity["stable"] == 1.0 and validity["canary"] == 0.0
    store = client.app.state.gateway.adapters.store  # type: ignore[attr-defined]
    assert store.stable("orders").version == 1 and store.is_retired(store.get("orders", 2))
    assert {send(client, key, f"user-{i}").headers["x-lorafleet-adapter"] for i in range(20)} == {"orders@1"}
    assert client.get("/admin/canaries/orders/events", headers=ADMIN).json()["data"][-1]["action"] == "rollback"


def test_without_enough_traffic_it_waits_says_so_and_never_promotes(gw) -> None:
    client, _, key = gw
    assert start(client, steps=[50, 100], min_samples=30).status_code == 201
    for i in range(6):
        send(client, key, f"user-{i}")
    for _ in range(5):
        tick(client)
    now = status(client)
    assert now["state"] == "running" and now["step"] == 1
    assert now["last_analysis"]["decision"] == "wait" and "need 30 each" in now["last_analysis"]["reason"]
    actions = [e["action"] for e in client.get("/admin/canaries/orders/events", headers=ADMIN).json()["data"]]
    assert actions == ["start", "wait"]  # said once, not at every tick


def test_pause_resume_abort_and_manual_promote(gw) -> None:
    client, _, key = gw
    start(client, steps=[50, 100], min_samples=1)
    assert client.post("/admin/canaries/orders/pause", json={}, headers=ADMIN).json()["state"] == "paused"
    for i in range(10):
        send(client, key, f"user-{i}")
    tick(client)
    assert status(client)["state"] == "paused"  # no decisions while paused
    assert_openai_error(client.post("/admin/canaries/orders/pause", json={}, headers=ADMIN), 409, "canary_state")
    assert client.post("/admin/canaries/orders/resume", json={}, headers=ADMIN).json()["state"] == "running"
    # Promoting or retiring behind the canary's back is refused until it ends.
    for method, path, body in [
        ("POST", "/admin/adapters/orders/promote", {"version": 2}),
        ("DELETE", "/admin/adapters/orders/versions/2", None),
    ]:
        error = assert_openai_error(client.request(method, path, json=body, headers=ADMIN), 409, "canary_running")
        assert "end it first" in error["message"]
    assert (
        client.post("/admin/canaries/orders/abort", json={"reason": "not today"}, headers=ADMIN).json()["state"]
        == "aborted"
    )
    store = client.app.state.gateway.adapters.store  # type: ignore[attr-defined]
    assert not store.is_retired(store.get("orders", 2))  # aborted: still published, just not served
    assert start(client).status_code == 201  # a new canary once the old one is over
    promoted = client.post("/admin/canaries/orders/promote", json={"reason": "looks good"}, headers=ADMIN).json()
    assert promoted["state"] == "promoted" and store.stable("orders").version == 2
    events = client.get("/admin/canaries/orders/events", headers=ADMIN).json()["data"]
    assert [e["action"] for e in events] == ["start", "pause", "resume", "abort", "start", "promote"]
    assert events[3]["reason"] == "not today" and events[5]["actor"] == "admin-api"


@pytest.mark.parametrize(
    ("body", "status_code", "code"),
    [
        ({"version": 99}, 404, "adapter_not_found"),
        ({"version": 3}, 400, "gate_required"),
        ({"version": 4}, 400, "gate_required"),
        ({"version": 1}, 400, "already_stable"),
        ({"version": 2, "steps": [50, 10]}, 422, "invalid_field"),
        ({"version": 2, "confidence": 2}, 422, "invalid_field"),
        ({"version": 2, "max_latency_ratio": 0.1}, 422, "invalid_field"),
        ({"version": 2, "bogus": 1}, 422, "invalid_field"),
        ({}, 422, "invalid_field"),
    ],
)
def test_bad_starts_are_clear_errors(gw, body: dict, status_code: int, code: str) -> None:
    client, _, _ = gw
    resp = client.post("/admin/canaries/orders", json=body, headers=ADMIN)
    assert_openai_error(resp, status_code, code)
    assert_openai_error(client.get("/admin/canaries/orders", headers=ADMIN), 404, "no_canary")


def test_other_refusals(gw) -> None:
    client, _, _ = gw
    assert_openai_error(client.post("/admin/canaries/nope", json={"version": 1}, headers=ADMIN), 404, "alias_not_found")
    assert_openai_error(client.post("/admin/canaries/orders/resume", json={}, headers=ADMIN), 404, "no_canary")
    assert_openai_error(client.post("/admin/canaries/orders/explode", json={}, headers=ADMIN), 422, "invalid_field")
    assert_openai_error(client.post("/admin/canaries/orders", json={"version": 2}), 401)
    assert start(client).status_code == 201
    assert_openai_error(start(client), 409, "canary_exists")


def test_forcing_past_a_failed_gate_is_recorded(gw) -> None:
    client, _, _ = gw
    assert start(client, version=4, force=True, reason="hotfix").status_code == 201
    first = client.get("/admin/canaries/orders/events", headers=ADMIN).json()["data"][0]
    assert "forced without a passing gate" in first["reason"] and "hotfix" in first["reason"]
    assert status(client)["forced"] is True


def test_a_canary_survives_a_gateway_restart(setup) -> None:
    settings, key = setup
    engine = FakeEngine()
    with TestClient(build_app(settings, engine=engine)) as client:
        start(client, steps=[10, 40, 100], min_samples=3, max_latency_ratio=100)  # fake-engine timings are noise
        for i in range(100):
            send(client, key, f"user-{i}")
        tick(client)
        assert status(client)["step"] == 2
    with TestClient(build_app(settings, engine=FakeEngine())) as client:
        after = status(client)
        assert after["state"] == "running" and after["step"] == 2 and after["weight"] == 0.4
        assert after["window"]["canary"]["requests"] == 0  # the step's window starts again...
        events = client.get("/admin/canaries/orders/events", headers=ADMIN).json()["data"]
        assert events[-1]["action"] == "resume_after_restart"  # ...and that is recorded
        variants = {variant(send(client, key, f"user-{i}")) for i in range(40)}
        assert variants == {"stable", "canary"}


def test_windows_shared_as_sketches_merge_to_the_same_counts_and_latencies() -> None:
    import random

    rng = random.Random(3)
    parts = [
        Window(
            requests=n,
            errors=1,
            checked=n - 1,
            valid=n - 2,
            per_token=[rng.lognormvariate(-4, 0.5) for _ in range(n)],
            ttft=[rng.uniform(0.05, 2) for _ in range(n // 2)] + [0.0],
        )
        for n in (40, 60)
    ]
    merged = Window.merged([w.to_json() for w in parts])
    assert (merged.requests, merged.errors, merged.checked, merged.valid) == (100, 2, 98, 96)
    exact = sorted(parts[0].per_token + parts[1].per_token)
    assert len(merged.per_token) == len(exact) and len(merged.ttft) == 52
    for got, want in zip(sorted(merged.per_token), exact, strict=True):
        assert abs(got - want) / want < 0.01  # within its 1% bucket
    assert min(merged.ttft) == 0.0
    assert len(parts[0].to_json()) < 2000  # compact: buckets, not samples


def test_a_promotion_committed_by_a_gateway_that_died_is_finished_once(gw) -> None:
    """The deciding gateway moved the stable pointer and died before recording the canary's end: the next decision
    finds the candidate already stable and finishes the canary (one promotion in the audit trail, old retired)."""
    client, _, key = gw
    assert start(client, steps=[50, 100], min_samples=10, max_latency_ratio=100).status_code == 201
    store = client.app.state.gateway.adapters.store  # type: ignore[attr-defined]
    store.promote("orders", 2, reason="canary: passed step 1 of 2", actor="canary", expected=1)  # and then it died
    for i in range(60):
        send(client, key, f"user-{i}")
    tick(client)
    final = status(client)
    assert final["state"] == "promoted", final
    assert [e["action"] for e in store.events("orders")].count("promote") == 2  # the fixture's, and the dead one's
    assert [e["action"] for e in store.events("orders")][-2:] == ["promote", "retire"]
    assert store.is_retired(store.get("orders", 1)) and store.stable("orders").version == 2
    events = client.get("/admin/canaries/orders/events", headers=ADMIN).json()["data"]
    assert events[-1]["action"] == "promote" and "stopped before recording it" in events[-1]["reason"]


@pytest.mark.parametrize("elsewhere", ["aborted", "paused"])
def test_what_another_gateway_did_to_a_canary_is_never_written_over(gw, elsewhere: str) -> None:
    """Another gateway aborts (or pauses) the canary while this one, which has not heard of it, analyses a
    window that would promote: nothing is written back over it, and nothing is promoted."""
    client, _, key = gw
    assert start(client, steps=[50, 100], min_samples=10, max_latency_ratio=100).status_code == 201
    for i in range(60):
        send(client, key, f"user-{i}")
    state = client.app.state.gateway  # type: ignore[attr-defined]
    other = CanaryRecords(state.tenants.engine)  # another gateway's view of the same database
    theirs = other.get(status(client)["id"])
    theirs.state = elsewhere  # type: ignore[assignment]
    assert other.save(theirs)
    tick(client)
    assert other.get(theirs.id).state == elsewhere  # not written back to running
    assert state.adapters.store.stable("orders").version == 1  # and not promoted
    followed = state.canaries.active.get("orders")
    assert (followed.state if followed else "aborted") == elsewhere  # this gateway now follows the database
    mine = state.canaries.active.get("orders")
    if mine is not None:  # paused: an action based on what this gateway saw before is refused, not applied
        mine.seen = ("running", 0)
        assert_openai_error(client.post("/admin/canaries/orders/promote", json={}, headers=ADMIN), 409, "canary_state")


def test_a_promotion_the_store_made_is_recorded_whatever_was_written_meanwhile(gw) -> None:
    """Once the store has moved the alias, the canary's end is recorded as promoted even if another gateway wrote
    the canary in between; an end the store has not acted on yet is refused instead."""
    client, _, _ = gw
    assert start(client, steps=[50, 100]).status_code == 201
    state = client.app.state.gateway  # type: ignore[attr-defined]
    canaries, portal = state.canaries, client.portal  # type: ignore[attr-defined]
    other = CanaryRecords(state.tenants.engine)  # another gateway's writes, after this one's last look
    theirs = other.get(canaries.active["orders"].id)
    theirs.state = "paused"  # type: ignore[assignment]
    assert other.save(theirs)
    stale = copy.copy(canaries.active["orders"])
    with pytest.raises(CanaryError):
        portal.call(functools.partial(canaries._finish, copy.copy(stale), "aborted"))
    assert other.get(stale.id).state == "paused"  # not written over
    portal.call(functools.partial(canaries._finish, copy.copy(stale), "promoted", decided=True))
    assert other.get(stale.id).state == "promoted"  # the store moved: the record says so
