"""An in-memory cache of state reads (the database, the adapter store), cleared by the owner's own writes.

The gateway reads a key's tenant, an alias's policy and an alias's serving
version on every request. This keeps each answer for ``ttl_s`` seconds (0: no
cache). Writes made through the owning store call ``changed()``, which clears
it at once; writes another process makes show once ``ttl_s`` has passed. A
read that overlapped a write is not kept: it may have seen the state before
that write.

For the event loop (``aget``): a fresh answer is returned from memory; a stale
one (older than ``ttl_s``, younger than ``2 × ttl_s``) is returned too, and
read again in a worker thread behind it (one read per key at a time), so a
request never waits on an expiry; a missing one is read in a worker thread.
After ``changed()`` nothing stale is served: the next request reads anew.

Safe across threads: admin routes write from FastAPI's thread pool while the
event loop reads, and ``cachetools.TTLCache`` is not thread-safe by itself
(its expiry walks and mutates a linked list on every access).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from cachetools import TTLCache

V = TypeVar("V")
log = logging.getLogger("lorafleet.gateway")


class ReadCache(Generic[V]):
    def __init__(self, ttl_s: float, maxsize: int = 10_000) -> None:
        self.ttl_s = ttl_s
        # value and when it was read; kept twice as long as it is fresh, to be served stale while read again
        self._known: TTLCache[str, tuple[V, float]] | None = TTLCache(maxsize, 2 * ttl_s) if ttl_s > 0 else None
        self.generation = 0  # bumped by every write
        self._lock = threading.Lock()  # held for a dict operation at most: never across I/O
        self._refreshing: set[str] = set()  # keys read again in the background now (event loop only)

    def lookup(self, key: str) -> tuple[V | None, bool]:
        """``(value, fresh)``; ``(None, False)`` when nothing is kept."""
        if self._known is None:
            return None, False
        with self._lock:
            found = self._known.get(key)
        if found is None:
            return None, False
        value, read_at = found
        return value, time.monotonic() - read_at < self.ttl_s

    def get(self, key: str) -> V | None:
        """The fresh value, if kept."""
        value, fresh = self.lookup(key)
        return value if fresh else None

    def put(self, key: str, value: V, read_at_generation: int) -> None:
        """Keep ``value``, read when ``generation`` was ``read_at_generation``, unless a write came since."""
        if self._known is None:
            return
        with self._lock:
            if read_at_generation == self.generation:
                self._known[key] = (value, time.monotonic())

    def changed(self) -> None:
        with self._lock:
            self.generation += 1
            if self._known is not None:
                self._known.clear()

    def values(self) -> list[V]:
        """Every value kept now (fresh or stale)."""
        if self._known is None:
            return []
        with self._lock:
            return [value for value, _ in self._known.values()]

    def drop(self, key: str) -> None:
        with self._lock:
            if self._known is not None:
                self._known.pop(key, None)

    async def aget(self, key: str, read: Callable[[], V]) -> V:
        """The value for ``key`` without the event loop ever waiting on ``read`` (see the module's docstring)."""
        value, fresh = self.lookup(key)
        if value is not None:
            if not fresh:
                self.refresh(key, lambda: self._read(key, read))
            return value
        return await asyncio.to_thread(self._read, key, read)

    def refresh(self, key: str, read: Callable[[], object]) -> None:
        """Run ``read`` (which keeps what it finds) in a worker thread, behind the answer already given; one at a
        time per key. Called on the event loop."""
        if key in self._refreshing:
            return
        self._refreshing.add(key)

        def done(task: asyncio.Task[object]) -> None:
            self._refreshing.discard(key)
            if not task.cancelled() and task.exception() is not None:
                log.warning("reading %r again failed: %s", key, task.exception())

        asyncio.get_running_loop().create_task(asyncio.to_thread(read)).add_done_callback(done)

    def _read(self, key: str, read: Callable[[], V]) -> V:
        generation = self.generation
        value = read()
        self.put(key, value, generation)
        return value
