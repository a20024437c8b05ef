"""Two `lorafleet serve` processes over one real vLLM engine, one PostgreSQL and one Redis, through the
official ``openai`` client: limits hold across both, a key revoked through one is refused by the other
within a second, and a canary driven through both reaches one decision both follow, even when the gateway
deciding it is killed mid-canary. (The replicas' own logic in depth: tests/services/test_limits_redis.py and
tests/services/test_postgres.py.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from contract.settings import CommonSettings
from lorafleet.launch import RunningEngine, RunningGateway, start_engine, start_gateway
from serving.state.ledger import open_store
from serving.state.tenants import Limits, TenantStore, key_id_of
from tests.conftest import PostgresServer, RedisServer


@pytest.fixture(scope="module")
def engine(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEngine]:
    running = start_engine(tmp_path_factory.mktemp("engine"), base_model)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def replicas(
    base_model: Path,
    engine: RunningEngine,
    postgres_server: PostgresServer,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[list[RunningGateway], str]]:
    database = postgres_server.database()
    shared = {"database_url": database, "redis_url": redis_server.database(2), "state_cache_s": "60"}
    tenants = TenantStore(database)
    acme = tenants.create("acme")
    tenants.grant(acme, "base")
    tenants.set_limits("acme", Limits(requests_per_minute=30))
    key = tenants.issue_key(acme)
    gateways: list[RunningGateway] = []
    try:
        for name in ("a", "b"):  # each its own data directory; the state and the counts are shared
            gateways.append(
                start_gateway(
                    tmp_path_factory.mktemp(f"gw-{name}"),
                    base_model,
                    engine_url=engine.url,
                    engine_key=engine.key,
                    **shared,
                )
            )
        yield gateways, key
    finally:
        for gateway in gateways:
            gateway.stop()


def complete(gateway: RunningGateway, key: str) -> int:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)
    try:
        client.completions.create(model="base", prompt="Say hi", max_tokens=1)
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def test_a_30_per_minute_tenant_gets_30_answers_across_two_gateways(replicas) -> None:
    gateways, key = replicas
    started = time.monotonic()
    statuses = [complete(gateways[i % 2], key) for i in range(40)]
    elapsed = time.monotonic() - started
    assert set(statuses) <= {200, 429}
    # One bucket of 30 for both, refilled at 0.5 a second while the 40 were sent.
    assert 30 <= statuses.count(200) <= 30 + int(elapsed * 0.5), (statuses, elapsed)
    assert statuses[:30] == [200] * 30


def test_a_key_revoked_through_one_gateway_is_refused_by_the_other_within_a_second(replicas) -> None:
    (a, b), _ = replicas
    admin = {"Authorization": f"Bearer {a.admin_key}"}
    issued = httpx.post(f"{a.url}/admin/tenants", json={"name": "brief", "aliases": ["base"]}, headers=admin)
    assert issued.status_code == 201, issued.text
    key = issued.json()["api_key"]
    assert complete(b, key) == 200  # B caches the key now, for a minute
    revoked = httpx.delete(
        f"{a.url}/admin/tenants/brief/keys/{key_id_of(key)}", headers={"Authorization": f"Bearer {a.admin_key}"}
    )
    assert revoked.status_code == 204
    started = time.monotonic()
    while complete(b, key) != 401:
        assert time.monotonic() - started < 1.0, "B still accepts the revoked key"
        time.sleep(0.05)


def test_a_postgres_restart_under_traffic_refuses_writes_serves_cached_keys_and_recovers(
    replicas, postgres_server: PostgresServer
) -> None:
    """Traffic through both gateways while PostgreSQL stops and starts again: every request is answered once (the
    key is cached), admin writes in between get 503 state_unavailable, and afterwards writes work and reach the
    other gateway, with neither gateway restarted."""
    (a, b), _ = replicas
    admin = {"Authorization": f"Bearer {a.admin_key}"}
    made = httpx.post(f"{a.url}/admin/tenants", json={"name": "steady", "aliases": ["base"]}, headers=admin)
    assert made.status_code == 201, made.text
    key = made.json()["api_key"]
    assert complete(a, key) == 200 and complete(b, key) == 200  # both hold the key in their cache now
    postgres_server.stop()
    try:
        statuses = [complete((a, b)[i % 2], key) for i in range(8)]
        refused = httpx.post(f"{a.url}/admin/tenants", json={"name": "while-down"}, headers=admin, timeout=30)
    finally:
        postgres_server.start()
    assert statuses == [200] * 8, statuses  # none lost, none refused: answered from the cached key
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "state_unavailable"
    assert refused.headers["retry-after"]
    deadline = time.monotonic() + 20
    while (
        created := httpx.post(
            f"{a.url}/admin/tenants", json={"name": "after", "aliases": ["base"]}, headers=admin, timeout=30
        )
    ).status_code != 201:
        assert time.monotonic() < deadline, created.text
        time.sleep(0.5)
    new_key = created.json()["api_key"]
    assert complete(b, new_key) == 200  # B reads what A wrote after the restart


def test_a_canary_through_two_gateways_survives_the_death_of_the_one_deciding(
    base_model: Path,
    engine: RunningEngine,
    flag_adapters: dict[str, Path],
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """flags@1 stable, flags@2 a gated candidate at 50%: 40 requests alternate between gateways A and B (neither
    sees min_samples of both variants alone), the deciding gateway is killed (SIGKILL: no goodbye), and the
    survivor takes the decision over and promotes on all 40 samples, once; no request was lost."""
    database = postgres_server.database()
    dirs = [tmp_path_factory.mktemp("canary-a"), tmp_path_factory.mktemp("canary-b")]
    (dirs[0] / "adapters").mkdir()
    (dirs[1] / "adapters").symlink_to(dirs[0] / "adapters")  # one store on a shared volume, as in a cluster
    store = open_store(CommonSettings(data_dir=dirs[0], database_url=database))
    for name in ("good", "good2"):
        version = store.publish(flag_adapters[name], "flags")
        store.record_gate(version, {"passed": True})
    store.promote("flags", 1)
    tenants = TenantStore(database)
    acme = tenants.create("acme")
    tenants.grant(acme, "flags")
    key = tenants.issue_key(acme)
    gateways = [
        start_gateway(
            d, base_model, engine_url=engine.url, engine_key=engine.key, database_url=database, canary_poll_s="0.5"
        )
        for d in dirs
    ]
    try:
        admin = [{"Authorization": f"Bearer {g.admin_key}"} for g in gateways]

        def status(i: int) -> dict:
            return dict(httpx.get(f"{gateways[i].url}/admin/canaries/flags", headers=admin[i], timeout=30).json())

        config = {"version": 2, "steps": [50, 100], "min_samples": 15, "interval_s": 45, "max_latency_ratio": 100}
        started = httpx.post(f"{gateways[0].url}/admin/canaries/flags", json=config, headers=admin[0], timeout=60)
        assert started.status_code == 201, started.text
        with ThreadPoolExecutor(8) as pool:  # well inside the interval: no decision before the kill
            served = list(pool.map(lambda i: ask(gateways[i % 2], key, user=f"user-{i}"), range(40)))
        assert time.time() - started.json()["created_at"] < 40, "too slow to kill the leader before the interval"
        assert all(ref.startswith("flags@") for ref in served), served  # every request answered
        time.sleep(1.5)  # both have shared their samples of the window
        states = [status(0), status(1)]
        assert [s["state"] for s in states] == ["running", "running"]  # the interval has not passed yet
        deciding = [s["decided_here"] for s in states]
        assert sorted(deciding) == [False, True], states
        dead = deciding.index(True)
        gateways[dead].proc.kill()  # mid-canary: its database session, and the lock, end with the process
        gateways[dead].proc.wait()
        survivor = 1 - dead
        deadline = time.monotonic() + 60
        while (now := status(survivor))["state"] == "running":
            assert time.monotonic() < deadline, now
            time.sleep(0.5)
        assert now["state"] == "promoted" and now["decided_here"], now
        events = httpx.get(f"{gateways[survivor].url}/admin/canaries/flags/events", headers=admin[survivor]).json()
        promotes = [e for e in events["data"] if e["action"] == "promote"]
        assert len(promotes) == 1, events
        window = promotes[0]["numbers"]["window"]
        assert window["stable"]["requests"] + window["canary"]["requests"] == 40  # the dead one's samples too
        # In the database's audit trail: one promotion of 2, and the old stable version retired.
        assert [(e["action"], e["to"]) for e in store.events("flags")] == [
            ("promote", 1),
            ("promote", 2),
            ("retire", 1),
        ]
        assert ask(gateways[survivor], key, user="after") == "flags@2"
    finally:
        for gateway in gateways:
            gateway.stop()


def ask(gateway: RunningGateway, key: str, user: str) -> str:
    """One chat request through the openai client; the adapter version that answered it."""
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model="flags",
        max_tokens=8,
        temperature=0,
        user=user,
        messages=[{"role": "user", "content": "Is order 1234 ready to ship? Answer with the JSON flag."}],
    )
    return raw.headers["x-lorafleet-adapter"]
