"""A canary's record and where it is kept: the ``canaries`` and ``canary_events`` tables of the state database.

Canaries and their audit events live in the database, so a canary survives a
gateway restart. The samples of the step under way live in each gateway's
memory; with several gateways on PostgreSQL each also shares its window's
compact form (``Window.to_json``) in ``canary_windows``, one row per gateway,
variant and window, which the deciding gateway merges.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa

from serving.canary.analysis import CanaryConfig
from serving.statedb import ensure_schema, metadata

State = Literal["running", "paused", "promoted", "rolled_back", "aborted"]
ACTIVE = ("running", "paused")
ONE_ACTIVE = sa.text("state IN (" + ", ".join(f"'{s}'" for s in ACTIVE) + ")")  # the partial unique index's
Variant = Literal["stable", "canary"]

canaries_table = sa.Table(
    "canaries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("alias", sa.String(64), nullable=False, index=True),
    sa.Column("candidate", sa.Integer, nullable=False),
    sa.Column("stable", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("forced", sa.Boolean, nullable=False),
    sa.Column("step_started_at", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_analysis", sa.Text, nullable=True),
    # One running or paused canary per alias, however many gateways start one at the same instant.
    sa.Index("uq_canaries_active_alias", "alias", unique=True, sqlite_where=ONE_ACTIVE, postgresql_where=ONE_ACTIVE),
)
events_table = sa.Table(
    "canary_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("canary_id", sa.ForeignKey("canaries.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("numbers", sa.Text, nullable=True),
    sa.Column("actor", sa.String(64), nullable=False),
)


windows_table = sa.Table(
    "canary_windows",
    metadata,
    sa.Column("canary_id", sa.ForeignKey("canaries.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("window", sa.Float, primary_key=True),  # the step_started_at the samples belong to
    sa.Column("variant", sa.String(8), primary_key=True),
    sa.Column("replica", sa.String(96), primary_key=True),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)


class CanaryError(Exception):
    """A canary operation was refused; ``status`` is the HTTP status the admin API answers with."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class Canary:
    id: int
    alias: str
    candidate: int
    stable: int
    state: State
    step: int
    config: CanaryConfig
    forced: bool
    step_started_at: float
    created_at: float
    last_analysis: dict[str, Any] | None = None

    @property
    def weight(self) -> float:
        """Share of users on the candidate now (0-1)."""
        return self.config.steps[self.step] / 100 if self.state in ACTIVE else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "alias": self.alias, "candidate": self.candidate, "stable": self.stable,
            "state": self.state, "step": self.step + 1, "steps": self.config.steps, "weight": self.weight,
            "step_started_at": self.step_started_at, "created_at": self.created_at, "forced": self.forced,
            "config": self.config.model_dump(), "last_analysis": self.last_analysis,
        }  # fmt: skip


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
            row = db.execute(sa.select(canaries_table).where(canaries_table.c.alias == alias)
                             .order_by(canaries_table.c.id.desc()).limit(1)).first()  # fmt: skip
        return None if row is None else _canary(row)

    def get(self, canary_id: int) -> Canary:
        with self.db.connect() as db:
            return _canary(db.execute(sa.select(canaries_table).where(canaries_table.c.id == canary_id)).one())

    def insert(self, alias: str, candidate: int, stable: int, config: CanaryConfig, forced: bool) -> Canary:
        """A new running canary; ``CanaryError`` 409 when the alias has one already (started by another gateway
        since this one last looked: the database's unique index decides)."""
        now = time.time()
        try:
            with self.db.begin() as db:
                inserted = db.execute(sa.insert(canaries_table).values(
                    alias=alias, candidate=candidate, stable=stable, state="running", step=0,
                    config=config.model_dump_json(), forced=forced, step_started_at=now, created_at=now,
                )).inserted_primary_key  # fmt: skip
        except sa.exc.IntegrityError as exc:
            raise CanaryError(409, f"alias {alias!r} already has a canary (started through another gateway); "
                              "abort it or let it finish first", "canary_exists") from exc  # fmt: skip
        assert inserted is not None
        return self.get(int(inserted[0]))

    def save(self, canary: Canary) -> None:
        with self.db.begin() as db:
            db.execute(sa.update(canaries_table).where(canaries_table.c.id == canary.id).values(
                state=canary.state, step=canary.step, step_started_at=canary.step_started_at,
                last_analysis=json.dumps(canary.last_analysis) if canary.last_analysis else None))  # fmt: skip

    def share(self, canary_id: int, window: float, replica: str, windows: dict[str, str]) -> None:
        """This gateway's samples of a canary's window, per variant (``Window.to_json``), replacing its last."""
        keys = (windows_table.c.canary_id == canary_id, windows_table.c.window == window,
                windows_table.c.replica == replica)  # fmt: skip
        with self.db.begin() as db:
            db.execute(sa.delete(windows_table).where(*keys))
            rows = [{"canary_id": canary_id, "window": window, "variant": variant, "replica": replica, "data": data,
                     "updated_at": time.time()} for variant, data in windows.items()]  # fmt: skip
            if rows:
                db.execute(sa.insert(windows_table), rows)

    def shared(self, canary_id: int, window: float) -> dict[str, list[str]]:
        """Every gateway's samples of a window, per variant."""
        with self.db.connect() as db:
            rows = db.execute(sa.select(windows_table.c.variant, windows_table.c.data).where(
                windows_table.c.canary_id == canary_id, windows_table.c.window == window)).all()  # fmt: skip
        out: dict[str, list[str]] = {}
        for variant, data in rows:
            out.setdefault(variant, []).append(data)
        return out

    def event(self, canary: Canary, action: str, reason: str, numbers: dict[str, Any] | None = None,
              actor: str = "canary") -> None:  # fmt: skip
        with self.db.begin() as db:
            db.execute(sa.insert(events_table).values(
                canary_id=canary.id, alias=canary.alias, at=time.time(), action=action, reason=reason,
                numbers=json.dumps(numbers) if numbers is not None else None, actor=actor))  # fmt: skip

    def events(self, alias: str) -> list[dict[str, Any]]:
        with self.db.connect() as db:
            rows = db.execute(sa.select(events_table).where(events_table.c.alias == alias)
                              .order_by(events_table.c.id)).all()  # fmt: skip
        return [{"canary": r.canary_id, "at": r.at, "time": datetime.fromtimestamp(r.at, UTC).isoformat(),
                 "action": r.action, "reason": r.reason, "numbers": json.loads(r.numbers) if r.numbers else None,
                 "actor": r.actor} for r in rows]  # fmt: skip


def _canary(row: Any) -> Canary:
    return Canary(row.id, row.alias, row.candidate, row.stable, row.state, row.step,
                  CanaryConfig.model_validate_json(row.config), row.forced, row.step_started_at, row.created_at,
                  json.loads(row.last_analysis) if row.last_analysis else None)  # fmt: skip
