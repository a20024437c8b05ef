"""The adapter store's ledger in the state database, for a fleet of gateways on PostgreSQL.

Which version of each alias is stable, which versions are retired and the audit
trail of promotions, rollbacks and retirements (``contract.store.Ledger``) live
in three tables: ``adapter_stable``, ``adapter_retired`` and ``adapter_events``.
A promotion or retirement is one transaction: it takes a transaction-scoped
advisory lock on the alias (a second writer is refused at once with
``StoreConflict``, which the admin API answers with 409), compares and sets the
pointer, appends its audit event and announces ``serving`` to every gateway
(``serving.state.changes``), all or nothing.

On SQLite (one machine, one gateway) the ledger stays as files beside the
versions (``FileLedger``), readable without a database and carried with the
store. A store that moves to PostgreSQL brings its files' history along: the
first opening copies the stable pointer, retirements and events of every alias
the database has no record of (``adopt_files``), once, under a lock, so
replicas starting together copy nothing twice. From then on the database is the
truth and the files are left as they were.
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from contract.settings import CommonSettings
from contract.store import AdapterStore, FileLedger, LedgerChange, StoreConflict
from serving.state.changes import SERVING, announce
from serving.state.db import ensure_schema, state_engine
from serving.state.tables import adapter_events_table, retired_table, stable_table

# pg_try_advisory_xact_lock(LEDGER_LOCK, <alias's crc32>): one writer per alias at a time, in every replica.
LEDGER_LOCK = 0x6C6F7261  # "lora"
ADOPT_LOCK = 0x6C6F7261666C6566  # held while a store's files are copied in (adopt_files)

_adopted: set[tuple[str, str]] = set()  # (database URL, store root) pairs this process has adopted
_adopt_lock = threading.Lock()


class SqlLedger:
    """``contract.store.Ledger`` in the state database (see the module's docstring)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        ensure_schema(engine)

    def stable(self, alias: str) -> int | None:
        with self.engine.connect() as db:
            return _stable(db, alias)

    def retired(self, alias: str) -> frozenset[int]:
        with self.engine.connect() as db:
            rows = db.execute(sa.select(retired_table.c.version).where(retired_table.c.alias == alias))
            return frozenset(row.version for row in rows)

    def events(self, alias: str) -> list[dict[str, Any]]:
        query = (
            sa.select(adapter_events_table)
            .where(adapter_events_table.c.alias == alias)
            .order_by(adapter_events_table.c.id)
        )
        with self.engine.connect() as db:
            return [_event(row._mapping) for row in db.execute(query)]

    @contextlib.contextmanager
    def change(self, alias: str) -> Iterator[LedgerChange]:
        with self.engine.begin() as db:
            if db.dialect.name == "postgresql":
                held = db.execute(
                    sa.text("SELECT pg_try_advisory_xact_lock(:space, :key)"),
                    {"space": LEDGER_LOCK, "key": _key(alias)},
                ).scalar()
                if not held:
                    raise StoreConflict(
                        f"another promotion or retirement of {alias!r} is in progress; look at "
                        "`lorafleet adapters history` and retry"
                    )
            yield _SqlChange(db, alias)
            announce(db, SERVING)  # heard by every gateway when (and only if) the change commits

    def adopt_files(self, root: Path) -> list[str]:
        """Copy the file ledger of every alias under ``root`` the database has no record of; the aliases copied."""
        files = FileLedger(root)
        aliases = AdapterStore(root, files).aliases()
        copied: list[str] = []
        with self.engine.begin() as db:
            if db.dialect.name == "postgresql":
                db.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADOPT_LOCK})
            for alias in aliases:
                known = db.execute(
                    sa.select(adapter_events_table.c.id).where(adapter_events_table.c.alias == alias).limit(1)
                )
                if known.first() is not None or _stable(db, alias) is not None:
                    continue
                stable, retired, events = files.stable(alias), files.retired(alias), files.events(alias)
                if stable is None and not retired and not events:
                    continue
                if stable is not None:
                    db.execute(stable_table.insert().values(alias=alias, version=stable, changed_at=_last_at(events)))
                for version in sorted(retired):
                    db.execute(retired_table.insert().values(alias=alias, version=version, at=_last_at(events)))
                for event in events:
                    db.execute(adapter_events_table.insert().values(_row(alias, event)))
                copied.append(alias)
            if copied:
                announce(db, SERVING)
        return copied


class _SqlChange:
    def __init__(self, db: sa.Connection, alias: str) -> None:
        self.db, self.alias = db, alias

    def stable(self) -> int | None:
        return _stable(self.db, self.alias)

    def set_stable(self, version: int, event: dict[str, Any]) -> None:
        where = stable_table.c.alias == self.alias
        if _stable(self.db, self.alias) is None:
            self.db.execute(stable_table.insert().values(alias=self.alias, version=version, changed_at=event["at"]))
        else:
            self.db.execute(stable_table.update().where(where).values(version=version, changed_at=event["at"]))
        self.db.execute(
            retired_table.delete().where((retired_table.c.alias == self.alias) & (retired_table.c.version == version))
        )
        self.db.execute(adapter_events_table.insert().values(_row(self.alias, event)))

    def retire(self, version: int, event: dict[str, Any]) -> None:
        retired = sa.select(retired_table.c.version).where(
            (retired_table.c.alias == self.alias) & (retired_table.c.version == version)
        )
        if self.db.execute(retired).first() is None:
            self.db.execute(retired_table.insert().values(alias=self.alias, version=version, at=event["at"]))
        self.db.execute(adapter_events_table.insert().values(_row(self.alias, event)))


def open_store(settings: CommonSettings, engine: sa.Engine | None = None) -> AdapterStore:
    """The adapter store with the ledger ``settings`` call for: the state database's tables on PostgreSQL (the
    files' history adopted on first opening), files beside the versions otherwise. ``engine``: the state
    database's engine when the caller has one already."""
    url = settings.state_url
    if not url.startswith("postgresql"):
        return AdapterStore(settings.adapters_dir)
    ledger = SqlLedger(engine if engine is not None else state_engine(url))
    marker = (url, str(settings.adapters_dir.resolve()))
    with _adopt_lock:
        if marker not in _adopted:
            ledger.adopt_files(settings.adapters_dir)
            _adopted.add(marker)
    return AdapterStore(settings.adapters_dir, ledger)


def _stable(db: sa.Connection, alias: str) -> int | None:
    value = db.execute(sa.select(stable_table.c.version).where(stable_table.c.alias == alias)).scalar()
    return None if value is None else int(value)


def _key(alias: str) -> int:
    """The alias's advisory lock key: a signed 32-bit number (PostgreSQL's two-key form takes int4)."""
    value = zlib.crc32(alias.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


def _row(alias: str, event: dict[str, Any]) -> dict[str, Any]:
    return {
        "alias": alias,
        "at": event["at"],
        "action": event["action"],
        "from_version": event.get("from"),
        "to_version": event["to"],
        "forced": bool(event.get("forced")),
        "gate_passed": event.get("gate_passed"),
        "reason": event.get("reason") or "",
        "actor": event.get("actor") or "unknown",
    }


def _event(row: Any) -> dict[str, Any]:
    return {
        "at": row["at"],
        "alias": row["alias"],
        "action": row["action"],
        "from": row["from_version"],
        "to": row["to_version"],
        "forced": row["forced"],
        "gate_passed": row["gate_passed"],
        "reason": row["reason"],
        "actor": row["actor"],
    }


def _last_at(events: list[dict[str, Any]]) -> float:
    return float(events[-1]["at"]) if events else 0.0
