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

**An outage is ridden out.** When a read fails because the database does not
answer (``serving.state.db.UNREACHABLE``), the last value read is served for
up to ``outage_s`` past its freshness, instead of failing every request once
``2 × ttl_s`` has passed. Meanwhile one read at a time probes the database (a
stale value's refresh, or one request's read of a value not kept); the other
reads of values not kept fail at once (``StateUnavailable``, a 503) rather
than each holding a worker thread for the connect timeout. The first read
that succeeds ends the outage.

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

from serving.state.db import UNREACHABLE, StateUnavailable

V = TypeVar("V")
T = TypeVar("T")
log = logging.getLogger("lorafleet.gateway")


class ReadCache(Generic[V]):
    def __init__(self, ttl_s: float, maxsize: int = 10_000, outage_s: float = 0.0) -> None:
        self.ttl_s, self.outage_s = ttl_s, outage_s
        # value and when it was read; kept twice as long as it is fresh (to be served stale while read again), or
        # as long as an outage may be ridden out
        kept = max(2 * ttl_s, ttl_s + outage_s)
        self._known: TTLCache[str, tuple[V, float]] | None = TTLCache(maxsize, kept) if ttl_s > 0 else None
        self.generation = 0  # bumped by every write
        self._lock = threading.Lock()  # held for a dict operation at most: never across I/O
        self._refreshing: set[str] = set()  # keys read again in the background now (event loop only)
        self.failing_since: float | None = None  # when reads started failing (the database does not answer)
        self._probing = False  # a read is trying the database during an outage (event loop only)

    def _entry(self, key: str) -> tuple[V | None, float]:
        """The value kept for ``key`` and its age in seconds (``None``, inf: nothing kept)."""
        if self._known is None:
            return None, float("inf")
        with self._lock:
            found = self._known.get(key)
        if found is None:
            return None, float("inf")
        value, read_at = found
        return value, time.monotonic() - read_at

    def lookup(self, key: str) -> tuple[V | None, bool]:
        """``(value, fresh)``; ``(None, False)`` when nothing is kept."""
        value, age = self._entry(key)
        return value, age < self.ttl_s

    def servable(self, key: str) -> tuple[V | None, bool]:
        """The value a request may be answered with now (``None``: read it), and whether to read it again
        behind the answer: fresh; stale (under ``2 × ttl_s``); or, while the database does not answer, under
        ``ttl_s + outage_s``."""
        value, age = self._entry(key)
        if value is None:
            return None, False
        if age < 2 * self.ttl_s or (self.failing_since is not None and age < self.ttl_s + self.outage_s):
            return value, age >= self.ttl_s
        return None, False

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
        value, stale = self.servable(key)
        if value is not None:
            if stale:
                self.refresh(key, lambda: self._read(key, read))
            return value
        return await self.read(key, lambda: self._read(key, read))

    async def read(self, key: str, read: Callable[[], T]) -> T | V:
        """``read`` (which keeps what it finds) in a worker thread, for a value that may not be served from
        memory. The database not answering: the last value kept, if an outage may still be ridden out on it;
        during an outage, ``StateUnavailable`` at once unless this read is the one probing the database."""
        probe = self.failing_since is not None
        if probe:
            if self._probing:
                raise StateUnavailable(f"the state database has not answered for {self.outage_for():.0f} s")
            self._probing = True
        try:
            return await asyncio.to_thread(self._tracked, read)
        except UNREACHABLE:
            value, age = self._entry(key)
            if value is not None and age < self.ttl_s + self.outage_s:
                return value
            raise
        finally:
            if probe:
                self._probing = False

    def outage_for(self) -> float:
        """Seconds since reads started failing (0 when they do not)."""
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since

    def refresh(self, key: str, read: Callable[[], object]) -> None:
        """Run ``read`` (which keeps what it finds) in a worker thread, behind the answer already given; one at a
        time per key, and one in all while the database does not answer. Called on the event loop."""
        if key in self._refreshing or (self.failing_since is not None and self._refreshing):
            return
        self._refreshing.add(key)

        def done(task: asyncio.Task[object]) -> None:
            self._refreshing.discard(key)
            if not task.cancelled() and task.exception() is not None:
                log.warning("reading %r again failed: %s", key, task.exception())

        asyncio.get_running_loop().create_task(asyncio.to_thread(self._tracked, read)).add_done_callback(done)

    def _tracked(self, read: Callable[[], T]) -> T:
        """``read``, noting whether the database answered (an outage starts at the first failure, ends at the
        first success)."""
        try:
            value = read()
        except UNREACHABLE:
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                log.warning("the state database does not answer: serving what is cached for up to %g s", self.outage_s)
            raise
        if self.failing_since is not None:
            log.warning("the state database answers again after %.0f s", self.outage_for())
            self.failing_since = None
        return value

    def _read(self, key: str, read: Callable[[], V]) -> V:
        generation = self.generation
        value = read()
        self.put(key, value, generation)
        return value
