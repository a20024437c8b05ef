"""An in-memory cache of state-database reads, cleared by the store's own writes.

The gateway reads a key's tenant and an alias's policy on every request. This
keeps each answer for ``ttl_s`` seconds (0: no cache). Writes made through the
owning store call ``changed()``, which clears it at once; writes another
process makes show once ``ttl_s`` has passed. A read that overlapped a write
is not kept: it may have seen the database before that write.

Safe across threads: admin routes write from FastAPI's thread pool while the
event loop reads, and ``cachetools.TTLCache`` is not thread-safe by itself
(its expiry walks and mutates a linked list on every access).
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

from cachetools import TTLCache

V = TypeVar("V")


class ReadCache(Generic[V]):
    def __init__(self, ttl_s: float, maxsize: int = 10_000) -> None:
        self._known: TTLCache[str, V] | None = TTLCache(maxsize, ttl_s) if ttl_s > 0 else None
        self.generation = 0  # bumped by every write
        self._lock = threading.Lock()  # held for a dict operation at most: never across I/O

    def get(self, key: str) -> V | None:
        if self._known is None:
            return None
        with self._lock:
            return self._known.get(key)

    def put(self, key: str, value: V, read_at_generation: int) -> None:
        """Keep ``value``, read when ``generation`` was ``read_at_generation``, unless a write came since."""
        if self._known is None:
            return
        with self._lock:
            if read_at_generation == self.generation:
                self._known[key] = value

    def changed(self) -> None:
        with self._lock:
            self.generation += 1
            if self._known is not None:
                self._known.clear()
