"""Which gateway decides the canaries: one leader among several gateways, elected by PostgreSQL.

The leader holds a session-level advisory lock on a connection of its own; a
gateway that dies, or loses the database, loses the session and with it the
lock, and the next gateway to ask takes it. On SQLite there is one gateway,
and it leads.
"""

from __future__ import annotations

import contextlib
import logging

import sqlalchemy as sa

log = logging.getLogger("lorafleet.canary")

# pg_try_advisory_lock's key for "this gateway decides for every canary": any fixed number, the same everywhere.
LEADER_LOCK = 0x6C66_6361_6E61  # "lfcana"


class Leadership:
    """Which gateway analyses and decides: on PostgreSQL, the holder of an advisory lock, on a connection of its
    own (the lock lives as long as that session: a gateway that dies, or loses the database, hands it over); on
    SQLite (one gateway), this one. ``held`` blocks on the database: call it in a worker thread."""

    def __init__(self, engine: sa.Engine) -> None:
        self.shared = engine.dialect.name == "postgresql"
        # Not pooled: closing the connection must end the session, and with it the lock.
        self._engine = sa.create_engine(engine.url, poolclass=sa.pool.NullPool) if self.shared else None
        self._held: sa.Connection | None = None

    def held(self) -> bool:
        if self._engine is None:
            return True
        if self._held is not None:
            try:
                self._held.execute(sa.text("SELECT 1"))
                return True
            except sa.exc.DBAPIError:  # the session is gone, and the lock with it
                self.release()
        try:
            connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except sa.exc.DBAPIError:
            return False
        if connection.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": LEADER_LOCK}).scalar():
            self._held = connection
            log.info("this gateway now analyses and decides the canaries")
            return True
        connection.close()
        return False

    @property
    def holding(self) -> bool:
        """Whether this gateway decides now (as of its last ``held``)."""
        return self._engine is None or self._held is not None

    def release(self) -> None:
        if self._held is not None:
            with contextlib.suppress(sa.exc.DBAPIError):
                self._held.close()
            self._held = None
