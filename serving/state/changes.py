"""Changes made through one gateway reach every other within a second: PostgreSQL LISTEN/NOTIFY.

Each gateway caches keys, alias policies and each alias's serving version
(``serving.state.cache``) for ``state_cache_s``; its own writes clear its own
cache at once. With several gateways on one PostgreSQL database, every write
also announces its topic on the channel ``lorafleet_changes`` (for the tenant
tables and policies inside the write's own transaction, so the announcement is
delivered only if the write commits), and every gateway listens: on hearing a
topic it forgets what it cached for it. A gateway that loses its listening
connection forgets everything when it gets one back (it may have missed
announcements meanwhile) and falls back to the cache's expiry while away.

On SQLite (one machine) nothing is announced or heard: there is one gateway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import sqlalchemy as sa

log = logging.getLogger("lorafleet.changes")

CHANNEL = "lorafleet_changes"
# The topics: what a gateway forgets on hearing each.
TENANTS = "tenants"  # tenants, grants, keys, limits
POLICIES = "policies"  # alias JSON policies
SERVING = "serving"  # which version each alias serves (publish, promote, retire, canary decisions)
CANARIES = "canaries"  # a canary started, stepped, paused, ended


def announce(db: sa.Connection, topic: str) -> None:
    """Within a write transaction: on PostgreSQL, every listening gateway hears ``topic`` when it commits."""
    if db.dialect.name == "postgresql":
        db.execute(sa.text("SELECT pg_notify(:channel, :topic)"), {"channel": CHANNEL, "topic": topic})


def announcer(engine: sa.Engine) -> Callable[[str], None]:
    """A function announcing a topic on its own (for writes outside the database: the adapter store). Called
    on the event loop, it sends from a worker thread and returns at once."""

    def send(topic: str) -> None:
        with engine.begin() as db:
            announce(db, topic)

    def announce_soon(topic: str) -> None:
        if engine.dialect.name != "postgresql":
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            send(topic)
            return
        task = loop.create_task(asyncio.to_thread(send, topic))
        task.add_done_callback(_log_failure)

    return announce_soon


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning(
            "could not announce a change to the other gateways: %s (they see it within state_cache_s)", task.exception()
        )


class ChangeFeed:
    """Listens on PostgreSQL and runs the handler of each topic heard; every handler on each (re)connection."""

    def __init__(self, url: str, handlers: Mapping[str, Callable[[], None]], retry_s: float = 1.0) -> None:
        self.conninfo = sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.handlers, self.retry_s = handlers, retry_s
        self.listening = asyncio.Event()

    @staticmethod
    def wanted(url: str) -> bool:
        return sa.engine.make_url(url).get_backend_name() == "postgresql"

    async def run(self) -> None:
        import psycopg

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=5
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._forget_all()  # whatever was announced while this gateway was not listening
                    self.listening.set()
                    log.info("listening for other gateways' changes on %s", CHANNEL)
                    async for note in conn.notifies():
                        handler = self.handlers.get(note.payload)
                        if handler is not None:
                            handler()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database restarted, the network broke: listen again
                if self.listening.is_set():
                    log.warning(
                        "stopped hearing other gateways' changes (%s); caches expire after state_cache_s "
                        "until listening again",
                        exc,
                    )
                self.listening.clear()
            await asyncio.sleep(self.retry_s)

    def _forget_all(self) -> None:
        for handler in self.handlers.values():
            handler()
