"""Per-tenant limits counted in a real Redis (``LORAFLEET_REDIS_URL``), shared by several gateway replicas.

Each "replica" here is its own ``RedisLimiter`` (its own connection pool and local counts) over one
``redis-server`` on loopback; ``tests/unit/test_gateway.py`` covers the per-process ``TenantLimiter``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from fastapi.testclient import TestClient

from contract.store import AdapterStore
from lorafleet.launch import free_port
from serving.app import build_app
from serving.config import GatewaySettings
from serving.errors import APIError
from serving.state.limits import RedisLimiter, Slot
from serving.state.tenants import Limits, Tenant, TenantStore
from tests.conftest import RedisServer, make_adapter
from tests.fakes import ADMIN_KEY, FakeEngine, assert_openai_error, chat, fake_base


def tenant(**limits: int) -> Tenant:
    return Tenant(id=1, name="acme", aliases=frozenset({"orders"}), limits=Limits(**limits))


def replicas(url: str, n: int = 2, **options: object) -> list[RedisLimiter]:
    prefix = f"test:{uuid.uuid4().hex}"  # every test counts apart
    return [RedisLimiter(url, prefix=prefix, **options) for _ in range(n)]  # type: ignore[arg-type]


async def outcome(limiter: RedisLimiter, who: Tenant, cost: int = 1) -> Slot | APIError:
    try:
        return await limiter.acquire(who, cost)
    except APIError as exc:
        return exc


async def close(*limiters: RedisLimiter) -> None:
    for limiter in limiters:
        await limiter.close()


def test_requests_per_minute_hold_across_replicas(redis_server: RedisServer) -> None:
    async def main() -> tuple[int, float, list[APIError]]:
        a, b = replicas(redis_server.url)
        acme = tenant(requests_per_minute=30)
        started = time.monotonic()
        results = await asyncio.gather(*(outcome((a, b)[i % 2], acme) for i in range(45)))
        elapsed = time.monotonic() - started
        await close(a, b)
        return sum(isinstance(r, Slot) for r in results), elapsed, [r for r in results if isinstance(r, APIError)]

    admitted, elapsed, refused = asyncio.run(main())
    # The bucket holds 30 and refills at 0.5 per second: 30 pass, plus what refilled while the 45 were sent.
    assert 30 <= admitted <= 30 + int(elapsed * 0.5)
    assert all(r.status == 429 and r.code == "rate_limit_exceeded" for r in refused)
    assert all(1 <= int(r.headers["Retry-After"]) <= 2 for r in refused)


def test_concurrency_is_counted_across_replicas_and_freed_on_release(redis_server: RedisServer) -> None:
    async def main() -> None:
        a, b = replicas(redis_server.url)
        acme = tenant(max_concurrent=3)
        held = [await a.acquire(acme, 2), await b.acquire(acme)]
        over = await outcome(b, acme)
        assert isinstance(over, APIError) and over.status == 429 and over.code == "concurrency_limit_exceeded"
        assert a.in_flight(acme) == 2 and b.in_flight(acme) == 1  # each replica's own share
        held[0].release()
        await asyncio.sleep(0.2)  # the release reaches Redis in the background
        assert isinstance(await outcome(b, acme, 2), Slot)
        await close(a, b)

    asyncio.run(main())


def test_a_dead_replicas_slots_expire(redis_server: RedisServer) -> None:
    async def main() -> None:
        a, b = replicas(redis_server.url, lease_s=1.0)
        acme = tenant(max_concurrent=1)
        await a.acquire(acme)  # never released: its gateway "dies"
        assert isinstance(await outcome(b, acme), APIError)
        await asyncio.sleep(1.2)
        assert isinstance(await outcome(b, acme), Slot)
        await close(a, b)

    asyncio.run(main())


def test_a_request_costing_more_than_the_limit_is_400_without_asking_redis() -> None:
    async def main() -> None:
        [limiter] = replicas(f"redis://127.0.0.1:{free_port()}/0", n=1)  # nothing listens there
        refused = await outcome(limiter, tenant(max_concurrent=2), cost=3)
        assert isinstance(refused, APIError) and refused.status == 400 and refused.code == "sequences_over_limit"
        assert isinstance(await outcome(limiter, tenant()), Slot)  # unlimited: Redis is never asked
        await close(limiter)

    asyncio.run(main())


def test_unreachable_redis_fails_closed_by_default_and_open_when_asked() -> None:
    async def main() -> None:
        url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        [closed] = replicas(url, n=1, timeout_s=0.2)
        [open_] = replicas(url, n=1, timeout_s=0.2, fail_open=True)
        acme = tenant(requests_per_minute=2)
        refused = await asyncio.wait_for(outcome(closed, acme), timeout=5)  # never hangs
        assert isinstance(refused, APIError) and refused.status == 503 and refused.code == "limits_unavailable"
        assert refused.headers["Retry-After"]
        # Open: admitted under this replica's own counts, which still hold.
        assert [isinstance(await outcome(open_, acme), Slot) for _ in range(3)] == [True, True, False]
        await close(closed, open_)

    asyncio.run(main())


def test_limits_recover_when_redis_comes_back(tmp_path: Path) -> None:
    port = free_port()

    async def main() -> None:
        [limiter] = replicas(f"redis://127.0.0.1:{port}/0", n=1, timeout_s=0.3)
        acme = tenant(requests_per_minute=100)
        server = RedisServer.start(tmp_path / "r1", port)
        assert isinstance(await outcome(limiter, acme), Slot)
        server.stop()
        down = await asyncio.wait_for(outcome(limiter, acme), timeout=5)
        assert isinstance(down, APIError) and down.status == 503
        server = RedisServer.start(tmp_path / "r2", port)
        try:
            assert isinstance(await outcome(limiter, acme), Slot)  # no restart of the "gateway"
        finally:
            server.stop()
        await close(limiter)

    asyncio.run(main())


def two_gateways(tmp_path: Path, redis_url: str, limits: Limits) -> tuple[list[TestClient], str]:
    """Two gateway apps (fake engines) over one state database and one Redis: two replicas' own logic."""
    settings = GatewaySettings(
        data_dir=tmp_path,
        base_model=str(fake_base(tmp_path)),
        admin_key=ADMIN_KEY,
        redis_url=redis_url,
        redis_timeout_s=0.3,
    )
    AdapterStore(settings.adapters_dir).publish(make_adapter(tmp_path / "src"), "orders")
    tenants = TenantStore(settings.state_url)
    acme = tenants.create(f"acme-{uuid.uuid4().hex[:8]}")
    tenants.grant(acme, "orders")
    tenants.set_limits(acme.name, limits)
    return [TestClient(build_app(settings, engine=FakeEngine())) for _ in range(2)], tenants.issue_key(acme)


def test_two_gateways_answer_a_30_per_minute_tenant_30_times(tmp_path: Path, redis_server: RedisServer) -> None:
    clients, key = two_gateways(tmp_path, redis_server.database(1), Limits(requests_per_minute=30))
    with clients[0] as a, clients[1] as b:
        started = time.monotonic()
        statuses = [chat((a, b)[i % 2], key).status_code for i in range(40)]
        elapsed = time.monotonic() - started
        assert set(statuses) == {200, 429}
        assert 30 <= statuses.count(200) <= 30 + int(elapsed * 0.5)
        assert statuses[:30] == [200] * 30  # both replicas drew from one bucket
        assert_openai_error(chat(b, key), 429, "rate_limit_exceeded")


def test_a_gateway_whose_redis_is_down_refuses_limited_tenants_with_503(tmp_path: Path) -> None:
    clients, key = two_gateways(tmp_path, f"redis://127.0.0.1:{free_port()}/0", Limits(requests_per_minute=30))
    with clients[0] as gateway:
        error = assert_openai_error(chat(gateway, key), 503, "limits_unavailable")
        assert "retry" in error["message"]


def test_tokens_per_minute_are_shared_across_replicas(redis_server: RedisServer) -> None:
    async def main() -> None:
        a, b = replicas(redis_server.url)
        acme = tenant(tokens_per_minute=20)
        (await a.acquire(acme)).release()
        a.charge(acme, 24)  # what the request used, reported when it ended
        await asyncio.sleep(0.2)  # the charge reaches Redis in the background
        refused = await outcome(b, acme)
        assert isinstance(refused, APIError) and refused.status == 429 and refused.code == "token_rate_limit_exceeded"
        assert 1 <= int(refused.headers["Retry-After"]) <= 15
        await close(a, b)

    asyncio.run(main())
