"""Several gateways on one real PostgreSQL (a throwaway cluster on loopback, ``tests/conftest.py``).

The schema migrates under an advisory lock when replicas start together; a change written through one
gateway (a key revoked, a policy set, a version promoted) reaches another within a second by LISTEN/NOTIFY,
though each caches for a minute here; a PostgreSQL restart makes admin writes fail with 503 while requests
with cached keys keep being served, and everything recovers without a restart. The gateways are two apps
in this process with fake engines (their own logic is under test; ``tests/e2e/test_fleet_e2e.py`` has real
engines).
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from contract.store import AdapterStore
from serving.app import build_app
from serving.config import GatewaySettings
from serving.state.db import head, state_engine
from serving.state.tenants import TenantStore, key_id_of
from tests.conftest import ROOT, PostgresServer, make_adapter
from tests.fakes import ADMIN_KEY, FakeEngine, assert_openai_error, chat, fake_base

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def eventually(check: Callable[[], bool], within_s: float) -> float:
    """Seconds until ``check`` held; fails if it did not within ``within_s``."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if check():
            return time.monotonic() - started
        time.sleep(0.02)
    pytest.fail(f"not within {within_s} s")


def test_replicas_starting_together_migrate_once(postgres_server: PostgresServer) -> None:
    url = postgres_server.database()
    env = {"LORAFLEET_DATABASE_URL": url, "PATH": "/usr/bin:/bin"}

    def upgrade(_: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lorafleet", "db", "upgrade"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=120,
        )

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(upgrade, range(4)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    with state_engine(url).connect() as db:
        assert db.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [head()]


@pytest.fixture
def two_gateways(tmp_path: Path, postgres_server: PostgresServer) -> Iterator[tuple[TestClient, TestClient, str]]:
    """Replicas A and B over one database and one adapter store, each caching state for a minute."""
    settings = GatewaySettings(
        data_dir=tmp_path,
        base_model=str(fake_base(tmp_path)),
        admin_key=ADMIN_KEY,
        database_url=postgres_server.database(),
        state_cache_s=60,
    )
    store = AdapterStore(settings.adapters_dir)
    store.publish(make_adapter(tmp_path / "v1"), "orders")
    store.publish(make_adapter(tmp_path / "v2"), "orders")
    tenants = TenantStore(settings.state_url)
    acme = tenants.create("acme")
    tenants.grant(acme, "orders")
    key = tenants.issue_key(acme)
    replicas = [TestClient(build_app(settings, engine=FakeEngine())) for _ in range(2)]
    with replicas[0] as a, replicas[1] as b:
        for gateway in (a, b):  # both hear the other's announcements before the test writes anything
            eventually(lambda g=gateway: listening(g), within_s=10)
        yield a, b, key


def listening(gateway: TestClient) -> bool:
    return gateway.app.state.changes.listening.is_set()  # type: ignore[attr-defined]


def test_a_key_revoked_through_one_gateway_is_refused_by_another_within_a_second(two_gateways) -> None:
    a, b, key = two_gateways
    assert chat(b, key).status_code == 200  # B now holds the key in its cache, for a minute
    revoked = a.delete(f"/admin/tenants/acme/keys/{key_id_of(key)}", headers=ADMIN)
    assert revoked.status_code == 204
    eventually(lambda: chat(b, key).status_code == 401, within_s=1.0)
    assert_openai_error(chat(b, key), 401)


def test_policies_and_promotions_reach_the_other_gateway_within_a_second(two_gateways) -> None:
    a, b, key = two_gateways
    assert chat(b, key).json()["model"] == "orders@2"
    assert b.get("/admin/aliases/orders/policy", headers=ADMIN).json()["json_mode"] is None
    body = {"version": 1, "force": True, "reason": "roll back"}
    assert a.post("/admin/adapters/orders/promote", headers=ADMIN, json=body).status_code == 200
    eventually(lambda: chat(b, key).json()["model"] == "orders@1", within_s=1.0)
    assert a.put("/admin/aliases/orders/policy", headers=ADMIN, json={"json_mode": "off"}).status_code == 200
    eventually(lambda: b.get("/admin/aliases/orders/policy", headers=ADMIN).json()["json_mode"] == "off", 1.0)


def test_a_postgres_restart_refuses_writes_keeps_serving_and_recovers(two_gateways, postgres_server) -> None:
    a, b, key = two_gateways
    assert chat(a, key).status_code == 200 and chat(b, key).status_code == 200
    postgres_server.stop()
    try:
        refused = a.post("/admin/tenants", headers=ADMIN, json={"name": "late"})
        error = assert_openai_error(refused, 503, "state_unavailable")
        assert "nothing was changed" in error["message"] and refused.headers["Retry-After"]
        assert [chat((a, b)[i % 2], key).status_code for i in range(6)] == [200] * 6  # cached keys still served
    finally:
        postgres_server.start()
    # Back without restarting either gateway: writes work, and B hears A's changes again.
    created = eventually(
        lambda: a.post("/admin/tenants", headers=ADMIN, json={"name": "late"}).status_code == 201, within_s=15
    )
    assert created < 15
    eventually(lambda: listening(b), within_s=10)
    assert a.delete(f"/admin/tenants/acme/keys/{key_id_of(key)}", headers=ADMIN).status_code == 204
    eventually(lambda: chat(b, key).status_code == 401, within_s=1.0)


def test_a_minute_long_outage_is_ridden_out_on_cached_keys_and_versions(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """PostgreSQL down for 60 s, six times the gateway's 10 s cache: a known key keeps getting its adapter alias
    (keys, policy and serving version all expired long ago; they were failing with 503 after 20 s); a key the
    gateway never saw is refused with 503 at once; when the database is back, everything reads anew."""
    settings = GatewaySettings(
        data_dir=tmp_path,
        base_model=str(fake_base(tmp_path)),
        admin_key=ADMIN_KEY,
        database_url=postgres_server.database(),
        state_cache_s=10,
        state_outage_s=300,
    )
    store = AdapterStore(settings.adapters_dir)
    store.publish(make_adapter(tmp_path / "v1"), "orders")
    tenants = TenantStore(settings.state_url)
    acme = tenants.create("acme")
    tenants.grant(acme, "orders")
    key, unseen = tenants.issue_key(acme), tenants.issue_key(acme)
    with TestClient(build_app(settings, engine=FakeEngine())) as gateway:
        eventually(lambda: listening(gateway), within_s=10)  # its first hearing forgets all: cache after it
        assert chat(gateway, key).json()["model"] == "orders@1"
        postgres_server.stop()
        try:
            answers, started = [], time.monotonic()
            while time.monotonic() - started < 60:
                answers.append(chat(gateway, key).status_code)
                time.sleep(5)
            assert answers == [200] * len(answers) and len(answers) >= 12
            refused = chat(gateway, unseen)
            assert_openai_error(refused, 503, "state_unavailable")
        finally:
            postgres_server.start()
        eventually(lambda: chat(gateway, unseen).status_code == 200, within_s=30)
        assert chat(gateway, key).json()["model"] == "orders@1"


@pytest.fixture
def canary_replicas(tmp_path: Path, postgres_server: PostgresServer) -> Iterator[tuple[list[TestClient], str]]:
    """Replicas A and B over one database and store, with orders@1 stable and orders@2 gated, ready to canary."""
    settings = GatewaySettings(
        data_dir=tmp_path,
        base_model=str(fake_base(tmp_path)),
        admin_key=ADMIN_KEY,
        database_url=postgres_server.database(),
        canary_poll_s=0.2,
    )
    store = AdapterStore(settings.adapters_dir)
    for i in (1, 2):
        store.publish(make_adapter(tmp_path / f"v{i}"), "orders")
        store.record_gate(store.get("orders", i), {"passed": True})
    store.promote("orders", 1)
    tenants = TenantStore(settings.state_url)
    acme = tenants.create("acme")
    tenants.grant(acme, "orders")
    key = tenants.issue_key(acme)
    replicas = [TestClient(build_app(settings, engine=FakeEngine())) for _ in range(2)]
    for replica in replicas:
        replica.__enter__()
    try:
        yield replicas, key
    finally:
        for replica in replicas:
            replica.__exit__(None, None, None)


def canary_of(gateway: TestClient) -> dict:
    return dict(gateway.get("/admin/canaries/orders", headers=ADMIN).json())


def leader_of(replicas: list[TestClient]) -> int:
    leaders = [i for i, r in enumerate(replicas) if canary_of(r)["decided_here"]]
    assert len(leaders) == 1, leaders
    return leaders[0]


def send_both(replicas: list[TestClient], key: str, n: int) -> None:
    for i in range(n):
        body = {"model": "orders", "messages": [{"role": "user", "content": "hi"}], "user": f"user-{i}"}
        answer = replicas[i % 2].post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text


def test_a_canary_driven_through_two_gateways_gets_one_decision_both_follow(canary_replicas) -> None:
    (a, b), key = canary_replicas
    # Neither gateway alone sees min_samples per variant (about 12 of 24 each): only the merged windows decide.
    config = {"version": 2, "steps": [50, 100], "min_samples": 20, "interval_s": 0.5, "max_latency_ratio": 100}
    assert a.post("/admin/canaries/orders", json=config, headers=ADMIN).status_code == 201
    eventually(lambda: canary_of(b)["weight"] == 0.5, within_s=1.0)  # B follows the start within a second
    send_both([a, b], key, 48)
    eventually(lambda: canary_of(a)["state"] != "running", within_s=10)
    assert canary_of(a)["state"] == "promoted", canary_of(a)
    eventually(lambda: canary_of(b)["state"] == "promoted", within_s=1.0)
    actions = [e["action"] for e in a.get("/admin/canaries/orders/events", headers=ADMIN).json()["data"]]
    assert actions.count("promote") == 1 and "rollback" not in actions and "step" not in actions, actions
    promoted = next(
        e for e in a.get("/admin/canaries/orders/events", headers=ADMIN).json()["data"] if e["action"] == "promote"
    )
    window = promoted["numbers"]["window"]
    assert window["stable"]["requests"] + window["canary"]["requests"] == 48  # both gateways' samples
    for gateway in (a, b):  # both serve the new stable version now
        eventually(lambda g=gateway: chat(g, key).json()["model"] == "orders@2", within_s=1.0)


def test_a_canary_started_through_two_gateways_at_once_starts_once(canary_replicas) -> None:
    """Neither gateway has seen the other's canary when both start one: the database's unique index lets one
    insert, the other answers 409 like any second canary of an alias."""
    replicas, _ = canary_replicas
    config = {"version": 2, "steps": [50, 100], "min_samples": 20, "interval_s": 60}
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda r: r.post("/admin/canaries/orders", json=config, headers=ADMIN), replicas))
    assert sorted(a.status_code for a in answers) == [201, 409], [a.text for a in answers]
    refused = next(a for a in answers if a.status_code == 409)
    assert_openai_error(refused, 409, "canary_exists")
    with state_engine(replicas[0].app.state.gateway.settings.state_url).connect() as db:  # type: ignore[attr-defined]
        active = db.execute(sa.text("SELECT count(*) FROM canaries WHERE state IN ('running', 'paused')")).scalar()
    assert active == 1


def test_when_the_deciding_gateway_dies_another_decides_on_everyones_samples(canary_replicas) -> None:
    replicas, key = canary_replicas
    config = {"version": 2, "steps": [50, 100], "min_samples": 20, "interval_s": 3, "max_latency_ratio": 100}
    assert replicas[0].post("/admin/canaries/orders", json=config, headers=ADMIN).status_code == 201
    eventually(lambda: all(canary_of(r)["weight"] == 0.5 for r in replicas), within_s=1.0)
    send_both(replicas, key, 48)
    time.sleep(0.6)  # both have shared their samples
    dead = leader_of(replicas)
    assert canary_of(replicas[dead])["state"] == "running"  # the interval has not passed: no decision yet
    replicas[dead].__exit__(None, None, None)  # the leader goes away mid-canary (its lock with its session)
    survivor = replicas[1 - dead]
    replicas.remove(replicas[dead])  # the fixture does not close it twice
    eventually(lambda: canary_of(survivor)["state"] == "promoted", within_s=10)
    events = survivor.get("/admin/canaries/orders/events", headers=ADMIN).json()["data"]
    assert [e["action"] for e in events].count("promote") == 1
    window = next(e for e in events if e["action"] == "promote")["numbers"]["window"]
    assert window["stable"]["requests"] + window["canary"]["requests"] == 48  # the dead one's samples too


# The adapter store's ledger in PostgreSQL (serving.state.ledger): stable pointers, retirements and audit events.


def pg_store(tmp_path: Path, url: str) -> AdapterStore:
    from contract.settings import CommonSettings
    from serving.state.ledger import open_store

    return open_store(CommonSettings(data_dir=tmp_path, database_url=url))


def test_promotions_at_once_through_postgres_have_one_winner(tmp_path: Path, postgres_server: PostgresServer) -> None:
    """Eight replicas promote different versions at the same moment, each having seen no stable version: one
    transaction wins; every other is told (StoreConflict, the admin API's 409) and changes nothing."""
    import threading

    from contract.store import StoreConflict

    url = postgres_server.database()
    files = AdapterStore(tmp_path / "adapters")
    for i in range(8):
        files.publish(make_adapter(tmp_path / f"v{i}"), "orders")
    replicas = [pg_store(tmp_path, url) for _ in range(8)]  # each its own engine, as separate gateways have
    start = threading.Barrier(8)

    def promote(version: int) -> str:
        start.wait()
        try:
            replicas[version - 1].promote("orders", version, force=True, expected=None, actor=f"replica-{version}")
        except StoreConflict as exc:
            assert "orders" in str(exc) and "retry" in str(exc)
            return "conflict"
        return "won"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(promote, range(1, 9)))
    assert sorted(outcomes) == ["conflict"] * 7 + ["won"]
    winner = outcomes.index("won") + 1
    store = pg_store(tmp_path, url)
    assert store.stable("orders").version == winner  # type: ignore[union-attr]
    assert [(e["to"], e["actor"]) for e in store.events("orders")] == [(winner, f"replica-{winner}")]
    assert files.stable("orders") is None  # the database is the truth: the files were not written


def test_a_promotion_is_all_or_nothing(
    tmp_path: Path, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If recording the audit event fails, the pointer does not move either (one transaction)."""
    import serving.state.ledger

    store = pg_store(tmp_path, postgres_server.database())
    for i in range(2):
        store.publish(make_adapter(tmp_path / f"v{i}"), "orders")
    store.promote("orders", 1, force=True)
    store.retire("orders", 2, reason="bad")

    def broken_row(alias: str, event: dict) -> dict:
        raise sa.exc.OperationalError("INSERT", {}, Exception("connection lost"))

    monkeypatch.setattr(serving.state.ledger, "_row", broken_row)
    with pytest.raises(sa.exc.OperationalError):
        store.promote("orders", 2, force=True)
    monkeypatch.undo()
    assert store.stable("orders").version == 1  # type: ignore[union-attr]
    assert store.is_retired(store.get("orders", 2))
    assert [e["action"] for e in store.events("orders")] == ["promote", "retire"]
    store.promote("orders", 2, force=True, reason="fixed")  # promoting a retired version brings it back
    assert not store.is_retired(store.get("orders", 2)) and store.serving("orders").version == 2  # type: ignore[union-attr]


def test_a_store_moving_to_postgres_keeps_its_history(tmp_path: Path, postgres_server: PostgresServer) -> None:
    """The files' stable pointer, retirements and events are copied into the database on first opening, once;
    from then on the database is the truth."""
    from serving.state import ledger

    files = AdapterStore(tmp_path / "adapters")
    for i in range(3):
        files.publish(make_adapter(tmp_path / f"v{i}"), "orders")
    files.publish(make_adapter(tmp_path / "t"), "toolcall")  # no ledger entries: nothing to copy
    files.promote("orders", 1, force=True, reason="first")
    files.promote("orders", 2, force=True, reason="second")
    files.retire("orders", 1, reason="old")
    url = postgres_server.database()
    store = pg_store(tmp_path, url)
    assert store.stable("orders").version == 2 and store.is_retired(store.get("orders", 1))  # type: ignore[union-attr]
    assert store.events("orders") == files.events("orders")
    assert store.serving("toolcall").version == 1  # type: ignore[union-attr]
    # Replicas opening it later copy nothing again, even from files changed behind the database's back.
    files.promote("orders", 3, force=True, reason="behind its back")
    assert ledger.SqlLedger(state_engine(url)).adopt_files(tmp_path / "adapters") == []
    assert store.stable("orders").version == 2 and len(store.events("orders")) == 3  # type: ignore[union-attr]


def test_two_gateways_uploading_at_once_never_pass_a_tenants_quota(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """Each upload's quota check and insert hold the tenant's advisory lock: of two 3,000-byte files against a
    5,000-byte quota, sent through two gateways' stores at the same instant, exactly one is kept."""
    import io
    import threading

    from serving.state.files import FileStore, QuotaExceeded

    url = postgres_server.database()
    tenant = TenantStore(url).create("acme")
    stores = [FileStore(state_engine(url), tmp_path / "files", 4096, 5000) for _ in range(2)]
    start = threading.Barrier(2)

    def upload(store: FileStore) -> str:
        start.wait()
        try:
            return store.add(tenant.id, "a.jsonl", "fine-tune", io.BytesIO(b"x" * 3000)).id
        except QuotaExceeded:
            return "refused"

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(upload, stores))
    assert sorted(o == "refused" for o in outcomes) == [False, True]
    assert stores[0].used(tenant.id) == 3000
    assert len([p for p in (tmp_path / "files").rglob("file-*")]) == 1  # the refused one left no bytes


def test_two_gateways_follow_one_jobs_rollout_and_record_each_step_once(canary_replicas) -> None:
    """A job's gated orders@2 (what a worker leaves): both gateways follow it; one canary starts, its start and its
    verdict are each one event of the job, whichever gateway wrote them."""
    from serving.state.rollouts import rollout_values

    replicas, _ = canary_replicas
    gateway = replicas[0].app.state.gateway  # type: ignore[attr-defined]
    tenant = gateway.tenants.get("acme")
    jobs = gateway.jobs
    spec = {"model": "m", "base_model": "m", "training_file": "file-x", "seed": 0, "hyperparameters": {}}
    job = jobs.create(tenant.id, None, **spec, options={"alias": "orders"})
    checked = jobs.claim("validator", "validating_files", 60, "local")
    assert checked is not None and jobs.release(job.id, str(checked.worker), "queued", "validated")
    trained = jobs.claim("worker", "queued", 60, "local")
    assert trained is not None
    rollout = {"alias": "orders", "version": 2, "stable": 1, "state": "canary_pending", "gate": {"passed": True}}
    values = rollout_values(rollout | {"canary": None, "reason": None})
    with jobs.finishing(job.id, str(trained.worker), "succeeded", fine_tuned_model="orders", **values):
        pass

    def messages() -> list[str]:
        events, _ = jobs.events(None, job.id, None, 100)
        return [e["message"] for e in events]

    eventually(lambda: any(m.startswith("Canary started") for m in messages()), within_s=10)
    time.sleep(2)  # both gateways have had rounds to (wrongly) start or record it again
    assert sum(m.startswith("Canary started") for m in messages()) == 1
    assert canary_of(replicas[1])["candidate"] == 2
    promoted = replicas[1].post("/admin/canaries/orders/promote", headers=ADMIN, json={"reason": "by hand"})
    assert promoted.status_code == 200, promoted.text
    eventually(lambda: jobs.get(None, job.id).rollout_state == "promoted", within_s=10)
    time.sleep(2)
    assert sum(m.startswith("Rollout ended") for m in messages()) == 1
