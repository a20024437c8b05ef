"""Fine-tuning jobs in the state database: what the API shows, what workers claim, and the lease between them.

A job's life, in OpenAI's statuses::

    validating_files ──> queued ──> running ──> succeeded
           │               │  ^        │  └──> failed
           └──> failed     │  │        └──> paused ──> queued (resume)
                           └──┴── cancelled (from any status that has not ended)

Everything a job is lives here, never only in a process: a worker claims a
job by writing its name and a lease into the job's row (on PostgreSQL with
``FOR UPDATE SKIP LOCKED``, so several workers on several machines share one
queue without taking the same job), renews the lease while the training runs,
and a job whose lease ran out (its worker died) goes back to the queue, to be
resumed from its last checkpoint by whichever worker claims it next.

Fairness: the next job is the one whose tenant has the fewest jobs running,
then whose tenant was served longest ago, then the oldest: one tenant's ten
queued jobs do not delay another tenant's first. Per-tenant limits on running
and waiting jobs are the tenant's ``Limits`` (``running_jobs``, ``queued_jobs``).

Cancelling ends a job at once, in the database; the worker running it sees
that on its next heartbeat and stops the training. A job that finishes and a
cancel that arrives at the same moment cannot both win: the finishing write
is conditional on the job still running under that worker's lease.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa

from serving.state.db import ensure_schema
from serving.state.tables import job_checkpoints_table, job_events_table, jobs_table, tenants_table, workers_table

Status = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
WAITING = ("validating_files", "queued", "paused")  # count against a tenant's queued_jobs
ENDED = ("succeeded", "failed", "cancelled")
JOB_PREFIX, EVENT_PREFIX, CHECKPOINT_PREFIX = "ftjob-", "ftevent-", "ftckpt-"
# pg_advisory_xact_lock(JOBS_LOCK, tenant id): one job creation of a tenant's at a time, in every gateway (the
# count against its limit and the insert must not interleave).
JOBS_LOCK = 0x6C6607
CLAIM_LOCK = 0x6C6608  # pg_advisory_xact_lock(CLAIM_LOCK): one claim at a time, in every worker


def fine_tuned_name(base_model: str, suffix: str | None, job_id: str) -> str:
    """The model a job makes: ``ft-<base>-<suffix>-<8 characters of the job id>``, lowercase. OpenAI's
    ``ft:<base>:<org>:<suffix>:<id>`` says the same, but colons are not valid in an alias, a store path or a
    metric label: this name is all three, unique (the job id's random part; the column is unique too) and at most
    61 characters (a job with ``lorafleet.alias`` publishes into that alias instead)."""

    def slug(text: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:24].strip("-")

    parts = ["ft", slug(base_model.rstrip("/").rsplit("/", 1)[-1]), slug(suffix or ""), job_id[-8:]]
    return "-".join(p for p in parts if p)


class JobError(Exception):
    """A job operation refused; the message says why and what to do."""


class JobNotFound(JobError):
    """No such job for this tenant (another tenant's job is reported the same)."""


class JobLimitReached(JobError):
    """The tenant has as many jobs waiting as its limit allows."""


class _Changed(Exception):
    """The job changed between its read and its write."""


class JobStateError(JobError):
    """The job is not in a status that allows the operation (cancel a finished job, resume a running one)."""


@dataclass(frozen=True)
class Job:
    id: str
    tenant_id: int
    status: str
    model: str
    base_model: str
    parent: str | None
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    hyperparameters: dict[str, Any]
    options: dict[str, Any]
    metadata: dict[str, str] | None
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    estimated_finish: int | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    result_files: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    desired: str | None = None
    worker: str | None = None
    lease_until: float | None = None
    attempts: int = 0  # times the job's worker was lost mid-training (its lease ran out)
    executor: str | None = None
    executor_ref: str | None = None
    queued_at: float | None = None
    reported: bool = False
    rollout: dict[str, Any] | None = None  # a job into an alias: its gate and canary (``serving.state.rollouts``)
    rollout_state: str | None = None

    def as_openai(self, organization: str) -> dict[str, Any]:
        """OpenAI's ``FineTuningJob``, field for field, with this service's extras under ``lorafleet``."""
        hyperparameters = dict(self.hyperparameters)
        return {
            "id": self.id,
            "object": "fine_tuning.job",
            "created_at": self.created_at,
            "error": self.error,
            "fine_tuned_model": self.fine_tuned_model,
            "finished_at": self.finished_at,
            "hyperparameters": hyperparameters,
            "model": self.model,
            "organization_id": organization,
            "result_files": list(self.result_files),
            "seed": self.seed,
            "status": self.status,
            "trained_tokens": self.trained_tokens,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "estimated_finish": self.estimated_finish,
            "integrations": None,
            "metadata": self.metadata,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            "user_provided_suffix": self.suffix,
            "lorafleet": {
                "base_model": self.base_model,
                "continues_from": self.parent,
                "options": self.options,
                "progress": self.progress,
                "workers_lost": self.attempts,
                "executor": self.executor,
                "pause_requested": self.desired == "pause",
                "rollout": self.rollout,
            },
        }


_JSON_COLUMNS = ("hyperparameters", "options", "metadata", "result_files", "error", "progress", "rollout")


def encoded(values: dict[str, Any]) -> dict[str, Any]:
    """Column values as stored: the JSON columns' as text."""
    return {k: (json.dumps(v) if k in _JSON_COLUMNS and v is not None else v) for k, v in values.items()}


def job_of_row(row: Any) -> Job:
    values = dict(row._mapping)
    for name in _JSON_COLUMNS:
        values[name] = json.loads(values[name]) if values[name] is not None else None
    values["result_files"] = values["result_files"] or []
    return Job(**values)


def event_json(row: Any) -> dict[str, Any]:
    """OpenAI's ``FineTuningJobEvent``."""
    return {
        "id": f"{EVENT_PREFIX}{row.id}",
        "object": "fine_tuning.job.event",
        "created_at": row.created_at,
        "level": row.level,
        "message": row.message,
        "data": json.loads(row.data) if row.data else None,
        "type": row.type,
    }


def checkpoint_json(row: Any, fine_tuned_model: str) -> dict[str, Any]:
    """OpenAI's ``FineTuningJobCheckpoint``; ``fine_tuned_model_checkpoint`` names the checkpoint as
    ``<model>:ckpt-step-<n>`` (it is kept for resuming, not served)."""
    return {
        "id": f"{CHECKPOINT_PREFIX}{row.id}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": row.created_at,
        "fine_tuned_model_checkpoint": f"{fine_tuned_model}:ckpt-step-{row.step}",
        "fine_tuning_job_id": row.job_id,
        "metrics": json.loads(row.metrics),
        "step_number": row.step,
    }


def _cursor(raw: str | None, prefix: str) -> int | None:
    """An event or checkpoint id as a page cursor (``None``: from the newest; a malformed id: refused)."""
    if raw is None:
        return None
    number = raw.removeprefix(prefix)
    if not raw.startswith(prefix) or not number.isdigit():
        raise JobError(f"after: {raw!r} is not an id of this list (they look like {prefix}123)")
    return int(number)


class JobStore:
    """The jobs of every tenant. Reads and writes are short transactions; call it off the event loop."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._creating = threading.Lock()  # SQLite (one gateway): the count against a limit and the insert together
        ensure_schema(engine)

    # -- the API's side ------------------------------------------------------------------------------------

    def create(self, tenant_id: int, queued_limit: int | None, **spec: Any) -> Job:
        """A new job in ``validating_files``; refused when the tenant's waiting jobs are at ``queued_limit``."""
        now = int(time.time())
        job_id = f"{JOB_PREFIX}{time.time_ns():016x}{secrets.token_hex(4)}"
        row = {
            "id": job_id,
            "tenant_id": tenant_id,
            "status": "validating_files",
            "created_at": now,
            "result_files": "[]",
            "attempts": 0,
            "reported": False,
        } | encoded(spec)
        with self._creating, self.engine.begin() as db:
            if db.dialect.name == "postgresql":  # another gateway's create for this tenant waits
                db.execute(sa.text("SELECT pg_advisory_xact_lock(:l, :t)"), {"l": JOBS_LOCK, "t": tenant_id})
            if queued_limit is not None:
                waiting = db.execute(
                    sa.select(sa.func.count())
                    .select_from(jobs_table)
                    .where(jobs_table.c.tenant_id == tenant_id, jobs_table.c.status.in_(WAITING))
                ).scalar_one()
                if waiting >= queued_limit:
                    raise JobLimitReached(
                        f"You have {waiting} fine-tuning jobs waiting, your limit is {queued_limit}; wait for one "
                        "to start or cancel one (POST /v1/fine_tuning/jobs/{id}/cancel)."
                    )
            db.execute(jobs_table.insert().values(**row))
            event_in(db, job_id, "Validating training file.")
        return self.get(tenant_id, job_id)

    def get(self, tenant_id: int | None, job_id: str) -> Job:
        """The job (``tenant_id`` ``None``: any tenant's, for operators)."""
        query = sa.select(jobs_table).where(jobs_table.c.id == job_id)
        if tenant_id is not None:
            query = query.where(jobs_table.c.tenant_id == tenant_id)
        with self.engine.connect() as db:
            row = db.execute(query).first()
        if row is None:
            raise JobNotFound(f"No such fine-tuning job: {job_id!r}.")
        return job_of_row(row)

    def page(
        self,
        tenant_id: int | None,
        *,
        after: str | None = None,
        limit: int = 20,
        metadata: dict[str, str] | None = None,
        statuses: tuple[str, ...] = (),
    ) -> tuple[list[Job], bool]:
        """Jobs newest first (``after``: a job id, the page starts past it), and whether more follow.

        ``metadata``: only jobs whose metadata has every given pair (compared in Python: metadata is at most 16
        short pairs, and this keeps the query the same on SQLite and PostgreSQL)."""
        key = (jobs_table.c.created_at, jobs_table.c.id)
        query = sa.select(jobs_table)
        if tenant_id is not None:
            query = query.where(jobs_table.c.tenant_id == tenant_id)
        if statuses:
            query = query.where(jobs_table.c.status.in_(statuses))
        if after is not None:
            cursor = self.get(tenant_id, after)
            query = query.where(sa.tuple_(*key) < (cursor.created_at, cursor.id))
        query = query.order_by(*(k.desc() for k in key))
        jobs: list[Job] = []
        with self.engine.connect() as db:
            for row in db.execute(query).yield_per(256):
                job = job_of_row(row)
                if metadata and any((job.metadata or {}).get(k) != v for k, v in metadata.items()):
                    continue
                jobs.append(job)
                if len(jobs) > limit:
                    break
        return jobs[:limit], len(jobs) > limit

    def cancel(self, tenant_id: int | None, job_id: str) -> Job:
        """End the job as ``cancelled`` (its worker stops the training on its next heartbeat)."""

        def change(db: sa.Connection, job: Job) -> dict[str, Any] | None:
            if job.status in ENDED:
                raise JobStateError(f"Job {job_id} has already {job.status}: only a job that has not ended cancels.")
            event_in(db, job_id, "Job cancelled.")
            return {"status": "cancelled", "finished_at": int(time.time()), "desired": None, "estimated_finish": None}

        return self._change(tenant_id, job_id, change)

    def pause(self, tenant_id: int | None, job_id: str) -> Job:
        """Pause a job: a waiting one at once, a running one at its next step (a checkpoint is saved first)."""

        def change(db: sa.Connection, job: Job) -> dict[str, Any] | None:
            if job.status == "running":
                event_in(db, job_id, "Pausing: the training stops after its current step and saves a checkpoint.")
                return {"desired": "pause"}
            if job.status == "queued":
                event_in(db, job_id, "Job paused.")
                return {"status": "paused"}
            if job.status != "paused":
                raise JobStateError(f"Job {job_id} is {job.status}: only a queued or running job pauses.")
            return None

        return self._change(tenant_id, job_id, change)

    def resume(self, tenant_id: int | None, job_id: str) -> Job:
        """Queue a paused job again; it continues from its last checkpoint."""

        def change(db: sa.Connection, job: Job) -> dict[str, Any] | None:
            if job.status == "running" and job.desired == "pause":  # not stopped yet: keep it running
                event_in(db, job_id, "Pause withdrawn.")
                return {"desired": None}
            if job.status == "paused":
                event_in(db, job_id, "Job resumed: queued to continue from its last checkpoint.")
                return {"status": "queued", "desired": None, "queued_at": time.time()}
            raise JobStateError(f"Job {job_id} is {job.status}: only a paused job resumes.")

        return self._change(tenant_id, job_id, change)

    def _change(
        self, tenant_id: int | None, job_id: str, change: Callable[[sa.Connection, Job], dict[str, Any] | None]
    ) -> Job:
        """Apply ``change`` (the values to write, from the job as read) only if the job is still as read: a worker
        finishing it, or another request, in between makes it read again and decide again (SQLite takes no row
        lock on a read)."""
        for _ in range(5):
            try:
                with self.engine.begin() as db:
                    job = self._locked(db, tenant_id, job_id)
                    values = change(db, job)
                    if values is None:
                        return job
                    as_read = sa.and_(
                        jobs_table.c.id == job_id,
                        jobs_table.c.status == job.status,
                        sa.func.coalesce(jobs_table.c.desired, "") == (job.desired or ""),
                        sa.func.coalesce(jobs_table.c.worker, "") == (job.worker or ""),
                    )
                    if db.execute(jobs_table.update().where(as_read).values(**values)).rowcount != 1:
                        raise _Changed  # rolls back this try, events included
                return self.get(tenant_id, job_id)
            except _Changed:
                continue
        raise JobStateError(f"Job {job_id} keeps changing; try again.")

    def events(self, tenant_id: int | None, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """The job's events, newest first (OpenAI's order), and whether older ones follow."""
        self.get(tenant_id, job_id)
        start = _cursor(after, EVENT_PREFIX)
        query = sa.select(job_events_table).where(job_events_table.c.job_id == job_id)
        if start is not None:
            query = query.where(job_events_table.c.id < start)
        with self.engine.connect() as db:
            rows = db.execute(query.order_by(job_events_table.c.id.desc()).limit(limit + 1)).all()
        return [event_json(r) for r in rows[:limit]], len(rows) > limit

    def checkpoints(self, tenant_id: int | None, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """The job's checkpoints with their metrics, newest first, and whether older ones follow."""
        job = self.get(tenant_id, job_id)
        start = _cursor(after, CHECKPOINT_PREFIX)
        query = sa.select(job_checkpoints_table).where(job_checkpoints_table.c.job_id == job_id)
        if start is not None:
            query = query.where(job_checkpoints_table.c.id < start)
        with self.engine.connect() as db:
            rows = db.execute(query.order_by(job_checkpoints_table.c.id.desc()).limit(limit + 1)).all()
        name = job.fine_tuned_model or job.id
        return [checkpoint_json(r, name) for r in rows[:limit]], len(rows) > limit

    def owned_model(self, tenant_id: int, name: str) -> Job | None:
        """The tenant's succeeded job that made the fine-tuned model ``name`` (a model of its own, not a version of an
        alias it publishes into), if any."""
        query = (
            sa.select(jobs_table)
            .where(
                jobs_table.c.fine_tuned_model == name,
                jobs_table.c.tenant_id == tenant_id,
                jobs_table.c.status == "succeeded",
            )
            .order_by(jobs_table.c.finished_at.desc())
        )
        with self.engine.connect() as db:
            jobs = [job_of_row(r) for r in db.execute(query)]
        return next((job for job in jobs if not job.options.get("alias")), None)

    def models(self, tenant_id: int) -> list[Job]:
        """The tenant's succeeded jobs that made a model of its own (not a version of an alias), oldest first."""
        query = (
            sa.select(jobs_table)
            .where(
                jobs_table.c.tenant_id == tenant_id,
                jobs_table.c.status == "succeeded",
                jobs_table.c.fine_tuned_model.is_not(None),
            )
            .order_by(jobs_table.c.created_at)
        )
        with self.engine.connect() as db:
            jobs = [job_of_row(r) for r in db.execute(query)]
        return [job for job in jobs if not job.options.get("alias")]  # an alias's versions are not a model of theirs

    def finished_since(self, since: float) -> list[Job]:
        """Jobs that succeeded at or after ``since`` (the gateway loads their models as they appear)."""
        query = sa.select(jobs_table).where(jobs_table.c.status == "succeeded", jobs_table.c.finished_at >= since)
        with self.engine.connect() as db:
            return [job_of_row(r) for r in db.execute(query)]

    def snapshot(self, alive_s: float) -> dict[str, Any]:
        """What the metrics show of the queue: jobs by status, how long the oldest queued job has waited, and the
        workers heard from within ``alive_s`` seconds."""
        now = time.time()
        with self.engine.connect() as db:
            grouped = sa.select(jobs_table.c.status, sa.func.count()).group_by(jobs_table.c.status)
            counts: dict[str, int] = {status: n for status, n in db.execute(grouped)}
            oldest = db.execute(
                sa.select(sa.func.min(jobs_table.c.queued_at)).where(jobs_table.c.status == "queued")
            ).scalar()
            workers = db.execute(
                sa.select(sa.func.count())
                .select_from(workers_table)
                .where(workers_table.c.heartbeat_at >= now - alive_s)
            ).scalar_one()
        return {"jobs": counts, "oldest_queued_s": now - oldest if oldest else 0.0, "workers": workers}

    def to_report(self, limit: int = 100) -> list[Job]:
        """Ended jobs not counted in the metrics yet, each handed to exactly one caller (of every gateway)."""
        ended = sa.and_(jobs_table.c.status.in_(ENDED), jobs_table.c.reported.is_(False))
        with self.engine.begin() as db:
            rows = db.execute(sa.select(jobs_table).where(ended).limit(limit)).all()
            mine = []
            for row in rows:
                taken = db.execute(jobs_table.update().where(jobs_table.c.id == row.id, ended).values(reported=True))
                if taken.rowcount == 1:
                    mine.append(job_of_row(row))
        return mine

    def _locked(self, db: sa.Connection, tenant_id: int | None, job_id: str) -> Job:
        query = sa.select(jobs_table).where(jobs_table.c.id == job_id)
        if tenant_id is not None:
            query = query.where(jobs_table.c.tenant_id == tenant_id)
        row = db.execute(query.with_for_update()).first()
        if row is None:
            raise JobNotFound(f"No such fine-tuning job: {job_id!r}.")
        return job_of_row(row)

    # -- the workers' side ---------------------------------------------------------------------------------

    def claim(self, worker: str, status: Status, lease_s: float, executor: str) -> Job | None:
        """Take the next job in ``status`` (``validating_files`` or ``queued``) under a lease, fairly across
        tenants and within each tenant's ``running_jobs``; ``None`` when there is none to take."""
        j = jobs_table
        other = j.alias("other")
        running = (
            sa.select(sa.func.count())
            .where(other.c.tenant_id == j.c.tenant_id, other.c.status == "running")
            .scalar_subquery()
        )
        served = sa.select(sa.func.max(other.c.started_at)).where(other.c.tenant_id == j.c.tenant_id).scalar_subquery()
        now = time.time()
        free = sa.or_(j.c.worker.is_(None), j.c.lease_until < now)
        query = sa.select(j.c.id).where(j.c.status == status, free)
        if status == "queued":
            limit = sa.select(tenants_table.c.running_jobs).where(tenants_table.c.id == j.c.tenant_id).scalar_subquery()
            query = query.where(sa.or_(limit.is_(None), running < limit)).order_by(
                running, sa.func.coalesce(served, 0), j.c.created_at, j.c.id
            )
        else:
            query = query.order_by(j.c.created_at, j.c.id)
        for _ in range(8):  # SQLite has no SKIP LOCKED: another worker may take the row first; try the next
            with self.engine.begin() as db:
                if db.dialect.name == "postgresql":
                    # One claim at a time across workers: each counts a tenant's running jobs after the last
                    # claim committed (its running_jobs limit holds); SKIP LOCKED passes rows a cancel holds.
                    db.execute(sa.text("SELECT pg_advisory_xact_lock(:l)"), {"l": CLAIM_LOCK})
                    query = query.with_for_update(skip_locked=True, of=j)
                job_id = db.execute(query.limit(1)).scalar()
                if job_id is None:
                    return None
                # The holder names this claim, not only the worker: a job claimed again (by the same worker after
                # its lease lapsed, or a restarted one of the same name) is not the old claim's to write.
                holder = f"{worker}#{secrets.token_hex(4)}"
                values: dict[str, Any] = {"worker": holder, "lease_until": now + lease_s, "executor": executor}
                if status == "queued":
                    values |= {"status": "running", "desired": None}
                    values["started_at"] = sa.func.coalesce(j.c.started_at, int(now))
                taken = db.execute(j.update().where(j.c.id == job_id, j.c.status == status, free).values(**values))
                if taken.rowcount == 1:
                    if status == "queued":
                        event_in(db, job_id, f"Fine-tuning job started (worker {worker}).")
                    return job_of_row(db.execute(sa.select(j).where(j.c.id == job_id)).one())
        return None

    def heartbeat(self, job_id: str, worker: str, lease_s: float) -> Job | None:
        """Renew the lease; ``None`` when the job is no longer this worker's (cancelled, or taken after the lease
        ran out): stop it."""
        with self.engine.begin() as db:
            renewed = db.execute(
                jobs_table.update()
                .where(jobs_table.c.id == job_id, jobs_table.c.worker == worker, jobs_table.c.status == "running")
                .values(lease_until=time.time() + lease_s)
            )
            if renewed.rowcount != 1:
                return None
            return job_of_row(db.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).one())

    def update(self, job_id: str, worker: str, **values: Any) -> bool:
        """Write fields of a job this worker holds (``False``: it no longer does)."""
        columns = encoded(values)
        with self.engine.begin() as db:
            done = db.execute(
                jobs_table.update()
                .where(jobs_table.c.id == job_id, jobs_table.c.worker == worker, jobs_table.c.status == "running")
                .values(**columns)
            )
        return done.rowcount == 1

    @contextmanager
    def finishing(self, job_id: str, worker: str, status: Status, **values: Any) -> Iterator[sa.Connection]:
        """End a job this worker holds as ``status``, with what the caller does inside the block (publishing the
        adapter, granting it) in the same transaction; raises ``JobStateError`` when the job is no longer this
        worker's (cancelled meanwhile): nothing in the block is then done."""
        columns = encoded(values)
        with self.engine.begin() as db:
            done = db.execute(
                jobs_table.update()
                .where(
                    jobs_table.c.id == job_id,
                    jobs_table.c.worker == worker,
                    jobs_table.c.status.in_(("running", "validating_files")),
                )
                .values(
                    status=status,
                    worker=None,
                    lease_until=None,
                    desired=None,
                    estimated_finish=None,
                    finished_at=int(time.time()) if status in ENDED else None,
                    **columns,
                )
            )
            if done.rowcount != 1:
                raise JobStateError(f"Job {job_id} is no longer held by {worker} (cancelled, or taken over).")
            yield db

    def release(self, job_id: str, worker: str, status: Status, message: str) -> bool:
        """Hand a job this worker holds back: ``queued`` (validated, or to run again) or ``paused``."""
        try:
            with self.finishing(job_id, worker, status, queued_at=time.time() if status == "queued" else None) as db:
                event_in(db, job_id, message)
        except JobStateError:
            return False
        return True

    def expired(self) -> list[str]:
        """Requeue running jobs whose worker stopped renewing their lease (it died); their ids."""
        now = time.time()
        lost = sa.and_(jobs_table.c.status == "running", jobs_table.c.lease_until < now)
        with self.engine.begin() as db:
            rows = db.execute(sa.select(jobs_table.c.id, jobs_table.c.worker).where(lost)).all()
            for job_id, worker in rows:
                moved = db.execute(
                    jobs_table.update()
                    .where(jobs_table.c.id == job_id, lost)
                    .values(
                        status="queued",
                        worker=None,
                        lease_until=None,
                        queued_at=now,
                        estimated_finish=None,
                        attempts=jobs_table.c.attempts + 1,
                    )
                )
                if moved.rowcount:
                    event_in(
                        db,
                        job_id,
                        f"Worker {str(worker).split('#')[0]} stopped answering; the job is queued again and resumes "
                        "from its last checkpoint.",
                        level="warn",
                    )
            # validating_files has no status to fall back to: a lapsed lease just frees it for another worker
            db.execute(
                jobs_table.update()
                .where(jobs_table.c.status == "validating_files", jobs_table.c.lease_until < now)
                .values(worker=None, lease_until=None)
            )
        return [job_id for job_id, _ in rows]

    def add_event(
        self, job_id: str, message: str, *, level: str = "info", type_: str = "message", data: Any = None
    ) -> None:
        with self.engine.begin() as db:
            event_in(db, job_id, message, level=level, type_=type_, data=data)

    def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, Any]) -> None:
        with self.engine.begin() as db:
            db.execute(
                job_checkpoints_table.delete().where(
                    job_checkpoints_table.c.job_id == job_id, job_checkpoints_table.c.step == step
                )
            )
            db.execute(
                job_checkpoints_table.insert().values(
                    job_id=job_id, step=step, created_at=int(time.time()), metrics=json.dumps(metrics)
                )
            )

    def beat(self, worker: str, executor: str, jobs: str | None) -> None:
        """Record that ``worker`` is alive (and which jobs it trains)."""
        now = time.time()
        with self.engine.begin() as db:
            done = db.execute(
                workers_table.update().where(workers_table.c.name == worker).values(heartbeat_at=now, jobs=jobs)
            )
            if done.rowcount == 0:
                db.execute(
                    workers_table.insert().values(
                        name=worker, executor=executor, started_at=now, heartbeat_at=now, jobs=jobs
                    )
                )

    def leave(self, worker: str) -> None:
        with self.engine.begin() as db:
            db.execute(workers_table.delete().where(workers_table.c.name == worker))

    def workers(self, alive_s: float) -> list[dict[str, Any]]:
        """Workers heard from within ``alive_s`` seconds."""
        query = sa.select(workers_table).where(workers_table.c.heartbeat_at >= time.time() - alive_s)
        with self.engine.connect() as db:
            return [dict(r._mapping) for r in db.execute(query.order_by(workers_table.c.name))]


def event_in(
    db: sa.Connection, job_id: str, message: str, *, level: str = "info", type_: str = "message", data: Any = None
) -> None:
    """Within a write transaction: add an event to the job's list (it is written only if the transaction is)."""
    db.execute(
        job_events_table.insert().values(
            job_id=job_id,
            created_at=int(time.time()),
            level=level,
            type=type_,
            message=message,
            data=json.dumps(data) if data is not None else None,
        )
    )
