"""The gateway's read cache: a write clears it, a read that overlapped a write is not kept, threads are safe."""

from __future__ import annotations

import sys
import threading

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
