"""The gateway's read cache: a write clears it, a read that overlapped a write is not kept, threads are safe, and
an outage of the database is ridden out on the last values read, for a bounded time."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest
import sqlalchemy as sa

from serving.state.cache import ReadCache


def test_a_write_clears_and_an_overlapping_read_is_not_kept() -> None:
    cache: ReadCache[str] = ReadCache(60)
    read_at = cache.generation
    cache.put("k", "v", read_at)
    assert cache.get("k") == "v"
    cache.changed()
    assert cache.get("k") is None
    cache.put("k", "stale", read_at)  # read before the write: not kept
    assert cache.get("k") is None


def test_reads_writes_and_expiry_from_many_threads() -> None:
    cache: ReadCache[int] = ReadCache(0.0005, maxsize=64)  # constant expiry and eviction churn
    errors: list[BaseException] = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible

    def work(n: int) -> None:
        try:
            for i in range(20_000):
                key = f"k{(i * 7 + n) % 200}"
                if i % 97 == 0:
                    cache.changed()
                cache.put(key, i, cache.generation)
                cache.get(key)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors[:3]


def test_aget_answers_stale_values_at_once_and_reads_them_again_behind() -> None:
    import asyncio
    import time

    cache: ReadCache[str] = ReadCache(0.1)
    source = {"k": "v1"}
    reads: list[str] = []

    def read() -> str:
        reads.append(source["k"])
        return source["k"]

    async def scenario() -> None:
        assert await cache.aget("k", read) == "v1" and reads == ["v1"]  # missing: read (in a worker thread)
        assert await cache.aget("k", read) == "v1" and reads == ["v1"]  # fresh: memory
        source["k"] = "v2"
        time.sleep(0.15)  # stale now
        assert await cache.aget("k", read) == "v1"  # at once, the old answer...
        await asyncio.sleep(0.05)
        assert reads == ["v1", "v2"] and await cache.aget("k", read) == "v2"  # ...read again behind it
        source["k"] = "v3"
        cache.changed()  # a write of the owner's: nothing stale is served after it
        assert await cache.aget("k", read) == "v3"

    asyncio.run(scenario())


class Database:
    """A read that answers, or fails as SQLAlchemy does when PostgreSQL is down; counts its calls."""

    def __init__(self) -> None:
        self.up, self.calls, self.value = True, 0, "v1"

    def read(self) -> str:
        self.calls += 1
        if not self.up:
            raise sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
        return self.value


def age(cache: ReadCache[str], key: str, seconds: float) -> None:
    """Make the kept value ``seconds`` older (the cache's clock is time.monotonic)."""
    value, read_at = cache._known[key]  # type: ignore[index]
    cache._known[key] = (value, read_at - seconds)  # type: ignore[index]


def test_an_outage_is_ridden_out_on_the_last_value_then_refused_past_its_limit() -> None:
    async def run() -> None:
        db, cache = Database(), ReadCache[str](10, outage_s=60)
        assert await cache.aget("k", db.read) == "v1"
        db.up = False
        age(cache, "k", 25)  # past 2 × ttl: before, a read (and a 503) on every request
        assert await cache.aget("k", db.read) == "v1"  # the read failed: the last value, and an outage begins
        assert cache.failing_since is not None
        calls = db.calls
        answers = [await cache.aget("k", db.read) for _ in range(50)]
        await asyncio.sleep(0.05)
        assert answers == ["v1"] * 50 and db.calls - calls <= 2  # one probe at a time, not one read per request
        # Values never kept: one read probes the database (and fails), the other is refused at once.
        outcomes = await asyncio.gather(cache.aget("a", db.read), cache.aget("b", db.read), return_exceptions=True)
        assert sorted(type(o).__name__ for o in outcomes) == ["OperationalError", "StateUnavailable"]
        age(cache, "k", 50)  # 75 s old: past ttl + outage_s
        with pytest.raises(sa.exc.OperationalError):
            await cache.aget("k", db.read)
        db.up, db.value = True, "v2"
        assert await cache.aget("k", db.read) == "v2" and cache.failing_since is None  # the outage is over

    asyncio.run(run())


def test_without_an_outage_an_old_value_is_read_again_not_served() -> None:
    async def run() -> None:
        db, cache = Database(), ReadCache[str](10, outage_s=60)
        await cache.aget("k", db.read)
        db.value = "v2"
        age(cache, "k", 25)
        assert await cache.aget("k", db.read) == "v2"  # the database answers: no stale value past 2 × ttl

    asyncio.run(run())
