"""Two `lorafleet serve` processes over one real vLLM engine, one PostgreSQL and one Redis, through the
official ``openai`` client: limits hold across both, and a key revoked through one is refused by the other
within a second. (The replicas' own logic in depth: tests/test_limits_redis.py and tests/test_postgres.py.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lorafleet.launch import RunningEngine, RunningGateway, start_engine, start_gateway
from serving.tenants import Limits, TenantStore, key_id_of
from tests.conftest import PostgresServer, RedisServer


@pytest.fixture(scope="module")
def replicas(
    base_model: Path,
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
    engine: RunningEngine = start_engine(tmp_path_factory.mktemp("engine"), base_model)
    gateways: list[RunningGateway] = []
    try:
        for name in ("a", "b"):  # each its own data directory; the state and the counts are shared
            gateways.append(start_gateway(tmp_path_factory.mktemp(f"gw-{name}"), base_model, engine_url=engine.url,
                                          engine_key=engine.key, **shared))  # fmt: skip
        yield gateways, key
    finally:
        for gateway in gateways:
            gateway.stop()
        engine.stop()


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
    revoked = httpx.delete(f"{a.url}/admin/tenants/brief/keys/{key_id_of(key)}",
                           headers={"Authorization": f"Bearer {a.admin_key}"})  # fmt: skip
    assert revoked.status_code == 204
    started = time.monotonic()
    while complete(b, key) != 401:
        assert time.monotonic() - started < 1.0, "B still accepts the revoked key"
        time.sleep(0.05)
