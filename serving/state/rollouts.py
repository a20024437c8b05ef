"""A fine-tuning job's way into its alias: the gate's verdict and the canary's progress, kept on the job's row.

    gating ──► gate_failed                        the version stays published and unserved
      │
      ├──► promoted                               no stable version yet: gated against the base model
      └──► canary_pending ──► canary ──► promoted | rolled_back | aborted
                  └──► not_started                the canary was refused (the reason says why)

The runner (the executor that trained the version) gates it and writes the
first of these in the transaction that ends the job; every gateway follows
the open ones (``serving.canary.rollouts``): it starts the canary and copies
its steps and verdict into the job's events. Each such write is conditional on
the rollout as it was read, so with several gateways every step is recorded
once, whichever gateway sees it first.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import sqlalchemy as sa

from serving.state.jobs import Job, encoded, event_in, job_of_row
from serving.state.tables import jobs_table
from serving.state.tenants import alone_in

RolloutState = Literal[
    "gating", "gate_failed", "canary_pending", "canary", "promoted", "rolled_back", "aborted", "not_started"
]
OPEN: tuple[RolloutState, ...] = ("canary_pending", "canary")  # a gateway has something to do
ENDED: tuple[RolloutState, ...] = ("gate_failed", "promoted", "rolled_back", "aborted", "not_started")

# One line per event a rollout writes: (message, data or None, level).
Event = tuple[str, dict[str, Any] | None, str]


def rollout_values(rollout: dict[str, Any]) -> dict[str, Any]:
    """The job's fields for ``rollout`` (its state also in a column of its own, to find the open ones), for
    ``JobStore.finishing`` or ``encoded``."""
    return {"rollout": rollout, "rollout_state": rollout["state"]}


class RolloutRecords:
    """The open rollouts, and their conditional writes. Call it off the event loop."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def open(self) -> list[Job]:
        """Succeeded jobs whose rollout waits on a gateway (a canary to start, or one under way)."""
        query = sa.select(jobs_table).where(jobs_table.c.rollout_state.in_(OPEN)).order_by(jobs_table.c.finished_at)
        with self.engine.connect() as db:
            return [job_of_row(row) for row in db.execute(query)]

    def alone(self, job: Job, alias: str) -> bool:
        """Whether ``alias`` is still granted to the job's tenant and to no other."""
        with self.engine.connect() as db:
            return alone_in(db, job.tenant_id, alias)

    def advance(self, job: Job, rollout: dict[str, Any], events: list[Event]) -> bool:
        """Write ``rollout`` and ``events`` if the job's rollout is still ``job.rollout`` (``False``: another gateway
        wrote it first; read it again)."""
        as_read = sa.and_(jobs_table.c.id == job.id, jobs_table.c.rollout == json.dumps(job.rollout))
        with self.engine.begin() as db:
            if db.execute(jobs_table.update().where(as_read).values(**encoded(rollout_values(rollout)))).rowcount != 1:
                return False
            for message, data, level in events:
                event_in(db, job.id, message, level=level, data=data)
        return True
