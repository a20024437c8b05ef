"""Where canaries are kept: the ``canaries``, ``canary_events`` and ``canary_windows`` tables.

Canaries and their audit events live in the database, so a canary survives a
gateway restart. The samples of the step under way live in each gateway's
memory; with several gateways on PostgreSQL each also shares its window's
compact form (``Window.to_json``) in ``canary_windows``, one row per gateway,
variant and window, which the deciding gateway merges.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from serving.canary.analysis import CanaryConfig
from serving.canary.state import ACTIVE, Canary, CanaryError
from serving.errors import ErrorCode
from serving.state.db import ensure_schema
from serving.state.tables import canaries_table, canary_events_table, windows_table


class CanaryRecords:
    """Reads and writes of canaries and their events; each write is one transaction."""

    def __init__(self, db: sa.Engine) -> None:
        self.db = db
        ensure_schema(db)

    def active(self) -> list[Canary]:
        with self.db.connect() as db:
            rows = db.execute(sa.select(canaries_table).where(canaries_table.c.state.in_(ACTIVE))).all()
        return [_canary(r) for r in rows]

    def latest(self, alias: str) -> Canary | None:
        """The alias's most recent canary, whatever its state."""
        with self.db.connect() as db:
            row = db.execute(
                sa.select(canaries_table)
                .where(canaries_table.c.alias == alias)
                .order_by(canaries_table.c.id.desc())
                .limit(1)
            ).first()
        return None if row is None else _canary(row)

    def get(self, canary_id: int) -> Canary:
        with self.db.connect() as db:
            return _canary(db.execute(sa.select(canaries_table).where(canaries_table.c.id == canary_id)).one())

    def find(self, canary_id: int) -> Canary | None:
        with self.db.connect() as db:
            row = db.execute(sa.select(canaries_table).where(canaries_table.c.id == canary_id)).first()
        return None if row is None else _canary(row)

    def insert(self, alias: str, candidate: int, stable: int, config: CanaryConfig, forced: bool) -> Canary:
        """A new running canary; ``CanaryError`` 409 when the alias has one already (started by another gateway
        since this one last looked: the database's unique index decides)."""
        now = time.time()
        try:
            with self.db.begin() as db:
                inserted = db.execute(
                    sa.insert(canaries_table).values(
                        alias=alias,
                        candidate=candidate,
                        stable=stable,
                        state="running",
                        step=0,
                        config=config.model_dump_json(),
                        forced=forced,
                        step_started_at=now,
                        created_at=now,
                    )
                ).inserted_primary_key
        except sa.exc.IntegrityError as exc:
            raise CanaryError(
                ErrorCode.CANARY_EXISTS,
                f"alias {alias!r} already has a canary (started through another gateway); "
                "abort it or let it finish first",
            ) from exc
        assert inserted is not None
        return self.get(int(inserted[0]))

    def save(self, canary: Canary) -> bool:
        """Write the canary's state, step, window and analysis, if the database still has the state and step
        this gateway last saw (``Canary.seen``); ``False`` when another gateway changed them first (nothing is
        written: read it again)."""
        where = [canaries_table.c.id == canary.id]
        if canary.seen is not None:
            where += [canaries_table.c.state == canary.seen[0], canaries_table.c.step == canary.seen[1]]
        with self.db.begin() as db:
            written = db.execute(
                sa.update(canaries_table)
                .where(*where)
                .values(
                    state=canary.state,
                    step=canary.step,
                    step_started_at=canary.step_started_at,
                    last_analysis=json.dumps(canary.last_analysis) if canary.last_analysis else None,
                )
            ).rowcount
        if written:
            canary.seen = (canary.state, canary.step)
        return bool(written)

    def share(self, canary_id: int, window: float, replica: str, windows: dict[str, str]) -> None:
        """This gateway's samples of a canary's window, per variant (``Window.to_json``), replacing its last."""
        keys = (
            windows_table.c.canary_id == canary_id,
            windows_table.c.window == window,
            windows_table.c.replica == replica,
        )
        with self.db.begin() as db:
            db.execute(sa.delete(windows_table).where(*keys))
            rows = [
                {
                    "canary_id": canary_id,
                    "window": window,
                    "variant": variant,
                    "replica": replica,
                    "data": data,
                    "updated_at": time.time(),
                }
                for variant, data in windows.items()
            ]
            if rows:
                db.execute(sa.insert(windows_table), rows)

    def shared(self, canary_id: int, window: float) -> dict[str, list[str]]:
        """Every gateway's samples of a window, per variant."""
        with self.db.connect() as db:
            rows = db.execute(
                sa.select(windows_table.c.variant, windows_table.c.data).where(
                    windows_table.c.canary_id == canary_id, windows_table.c.window == window
                )
            ).all()
        out: dict[str, list[str]] = {}
        for variant, data in rows:
            out.setdefault(variant, []).append(data)
        return out

    def event(
        self, canary: Canary, action: str, reason: str, numbers: dict[str, Any] | None = None, actor: str = "canary"
    ) -> None:
        with self.db.begin() as db:
            db.execute(
                sa.insert(canary_events_table).values(
                    canary_id=canary.id,
                    alias=canary.alias,
                    at=time.time(),
                    action=action,
                    reason=reason,
                    numbers=json.dumps(numbers) if numbers is not None else None,
                    actor=actor,
                )
            )

    def events(self, alias: str) -> list[dict[str, Any]]:
        return self._events(canary_events_table.c.alias == alias)

    def events_of(self, canary_id: int, after: int = 0) -> list[dict[str, Any]]:
        """One canary's events past the event id ``after``, oldest first."""
        return self._events(canary_events_table.c.canary_id == canary_id, canary_events_table.c.id > after)

    def _events(self, *where: Any) -> list[dict[str, Any]]:
        with self.db.connect() as db:
            rows = db.execute(sa.select(canary_events_table).where(*where).order_by(canary_events_table.c.id)).all()
        return [
            {
                "id": r.id,
                "canary": r.canary_id,
                "at": r.at,
                "time": datetime.fromtimestamp(r.at, UTC).isoformat(),
                "action": r.action,
                "reason": r.reason,
                "numbers": json.loads(r.numbers) if r.numbers else None,
                "actor": r.actor,
            }
            for r in rows
        ]


def _canary(row: Any) -> Canary:
    canary = Canary(
        row.id,
        row.alias,
        row.candidate,
        row.stable,
        row.state,
        row.step,
        CanaryConfig.model_validate_json(row.config),
        row.forced,
        row.step_started_at,
        row.created_at,
        json.loads(row.last_analysis) if row.last_analysis else None,
    )
    canary.seen = (canary.state, canary.step)
    return canary
