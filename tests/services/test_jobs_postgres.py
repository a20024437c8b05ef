"""Fine-tuning jobs on PostgreSQL, as several workers on several machines share them: each job is claimed by
exactly one worker however many ask at once (``FOR UPDATE SKIP LOCKED``), the queue stays fair, a lapsed lease
goes back to the queue, and a cancel and a finish racing each other cannot both win."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from lorafleet.launch import PostgresServer
from serving.state.db import state_engine, upgrade
from serving.state.jobs import JobStateError, JobStore
from serving.state.tenants import Limits, TenantStore

pytestmark = pytest.mark.services


def _spec() -> dict[str, Any]:
    return {"model": "m", "base_model": "m", "training_file": "file-x", "seed": 0, "hyperparameters": {}, "options": {}}


@pytest.fixture
def pg_jobs(postgres_server: PostgresServer) -> tuple[JobStore, dict[str, int]]:
    url = postgres_server.database()
    upgrade(state_engine(url))
    tenants = TenantStore(url)
    ids = {n: tenants.enroll(n, limits=Limits(running_jobs=None, queued_jobs=None))[0].id for n in ("a", "b", "c")}
    return JobStore(tenants.engine), ids


def _queue(jobs: JobStore, tenant: int) -> str:
    job = jobs.create(tenant, None, **_spec())
    claimed = jobs.claim("validator", "validating_files", 60, "local")
    assert claimed is not None and jobs.release(job.id, str(claimed.worker), "queued", "validated")
    return job.id


def test_workers_asking_at_once_each_get_a_different_job(pg_jobs) -> None:
    jobs, ids = pg_jobs
    made = {_queue(jobs, ids[name]) for name in ("a", "b", "c") for _ in range(4)}
    taken: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def work(n: int) -> None:
        start.wait()
        while (job := jobs.claim(f"w{n}", "queued", 60, "local")) is not None:
            with lock:
                taken.append(job.id)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(taken) == sorted(made)  # every job once, none twice


def test_the_postgres_queue_is_fair_and_leases_lapse(pg_jobs) -> None:
    jobs, ids = pg_jobs
    labels = {}
    for n in (1, 2):
        for name in ("a", "b", "c"):
            labels[_queue(jobs, ids[name])] = f"{name}{n}"
    order = []
    for _ in range(6):
        job = jobs.claim("w", "queued", 0.05, "local")
        assert job is not None
        order.append(labels[job.id])
    assert order == ["a1", "b1", "c1", "a2", "b2", "c2"]
    time.sleep(0.1)
    assert len(jobs.expired()) == 6  # the worker stopped renewing: all back in the queue
    again = jobs.claim("w2", "queued", 60, "local")
    assert again is not None and again.attempts == 1  # its worker was lost once


def test_a_cancel_and_a_finish_racing_on_postgres_have_one_winner(pg_jobs) -> None:
    jobs, ids = pg_jobs
    job_id = _queue(jobs, ids["a"])
    held = jobs.claim("w", "queued", 60, "local")
    assert held is not None
    outcome: dict[str, Any] = {}
    entered = threading.Event()

    def cancel() -> None:
        entered.wait(10)
        try:
            outcome["cancel"] = jobs.cancel(None, job_id).status
        except JobStateError as exc:
            outcome["cancel"] = str(exc)

    canceller = threading.Thread(target=cancel)
    canceller.start()
    with jobs.finishing(job_id, str(held.worker), "succeeded", fine_tuned_model="ft-x"):
        entered.set()
        time.sleep(0.5)  # the cancel waits on the row, then finds the job ended
    canceller.join(10)
    assert jobs.get(None, job_id).status == "succeeded"
    assert "already succeeded" in outcome["cancel"]
