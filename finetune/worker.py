"""``lorafleet worker``: takes fine-tuning jobs from the state database and sees each through.

The loop, every ``worker_poll_s``:

1. say it is alive (``fine_tuning_workers``: the gateways' metrics and alerts read it), and put back in the
   queue the jobs whose worker stopped renewing their lease (another worker died);
2. validate the next job in ``validating_files`` (the data check, here: no model, no torch) and queue it,
   or fail it with its file's first errors and their line numbers;
3. while it has a free slot, claim the next queued job (fair across tenants, within their ``running_jobs``;
   ``serving.state.jobs``) and start its training on the executor.

A job in training is watched from a thread of its own: its lease renewed every
``job_heartbeat_s``; stopped at once when it is no longer this worker's
(cancelled); when the training ends without saying how (killed, out of
memory), failed with the end of its log. Several workers, on several
machines, share one queue: a job is claimed by exactly one of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from typing import Any

from finetune.executors import Executor, Run, executor_for
from finetune.settings import WorkerSettings
from finetune.validate import check_file, described, file_error
from serving.state.db import state_engine
from serving.state.files import FileNotFound, FileStore
from serving.state.jobs import Job, JobStateError, JobStore

log = logging.getLogger("lorafleet.worker")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    def __init__(self, settings: WorkerSettings, executor: Executor | None = None, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or worker_name()
        engine = state_engine(settings.state_url)
        self.jobs = JobStore(engine)
        self.files = FileStore(engine, settings.files_root, max_bytes=1 << 62, quota_bytes=1 << 62)
        self.executor = executor or executor_for(settings)
        self.running: dict[str, threading.Thread] = {}
        self.runs: dict[str, Run] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        """Work until ``stop`` is called (or the process is told to stop); jobs in training are left to their
        leases: another worker resumes them."""
        log.info("worker %s: %s executor, %d slot(s)", self.name, self.executor.kind, self.settings.worker_slots)
        try:
            while not self.stopping.is_set():
                try:
                    busy = self.round()
                except Exception:  # one failed round (the database restarting) must not end the worker
                    log.exception("worker round failed")
                    busy = False
                if not busy:
                    self.stopping.wait(self.settings.worker_poll_s)
        finally:
            self.jobs.leave(self.name)

    def stop(self, grace_s: float = 60.0) -> None:
        """Stop taking jobs; the trainings under way save a checkpoint and go back to the queue (within
        ``grace_s``; a training that takes longer is left to its lease)."""
        self.stopping.set()
        for run in list(self.runs.values()):
            run.interrupt()
        for thread in list(self.running.values()):
            thread.join(grace_s)

    def round(self) -> bool:
        """One pass of the loop; whether it found work (then the next pass comes at once)."""
        self.running = {k: t for k, t in self.running.items() if t.is_alive()}
        self.jobs.beat(self.name, self.executor.kind, ",".join(sorted(self.running)) or None)
        for job_id in self.jobs.expired():
            log.warning("job %s: its worker stopped renewing the lease; queued again", job_id)
        busy = False
        validating = self.jobs.claim(self.name, "validating_files", self.settings.job_lease_s, self.executor.kind)
        if validating is not None:
            self.validate(validating)
            busy = True
        if len(self.running) < self.settings.worker_slots:
            job = self.jobs.claim(self.name, "queued", self.settings.job_lease_s, self.executor.kind)
            if job is not None:
                self.start(job)
                busy = True
        return busy

    def validate(self, job: Job) -> None:
        """``validating_files``: check the job's files; queue the job, or fail it naming the lines."""
        counts = []
        for param in ("training_file", "validation_file"):
            file_id = getattr(job, param)
            if file_id is None:
                continue
            try:
                path = self.files.path(self.files.get(job.tenant_id, file_id))
                report = check_file(path, job.options.get("schema"))
            except FileNotFound:
                self._end(
                    job,
                    "failed",
                    {
                        "code": "file_deleted",
                        "param": param,
                        "message": f"{param} {file_id} "
                        "was deleted before the job started; upload it again and create a new job.",
                    },
                )
                return
            except (OSError, UnicodeDecodeError) as exc:
                self._end(
                    job,
                    "failed",
                    {
                        "code": "invalid_file",
                        "param": param,
                        "message": f"{param} {file_id} cannot be read as text: {exc}",
                    },
                )
                return
            if report.errors:
                self._end(job, "failed", file_error(report, file_id, param))
                return
            for warning in described(report.warnings, file_id):
                self.jobs.add_event(job.id, f"{param}: {warning}", level="warn")
            counts.append(f"{param} {file_id}: {len(report.examples)} examples from {report.rows} rows")
        self.jobs.release(job.id, self.name, "queued", "Files validated (" + "; ".join(counts) + "). Job queued.")

    def _end(self, job: Job, status: Any, error: dict[str, Any]) -> None:
        try:
            with self.jobs.finishing(job.id, self.name, status, error=error):
                pass
        except JobStateError:
            return
        self.jobs.add_event(job.id, f"Fine-tuning job failed: {error['message']}", level="error")

    def start(self, job: Job) -> None:
        if job.attempts > self.settings.job_attempts:
            self._end(
                job,
                "failed",
                {
                    "code": "too_many_attempts",
                    "param": None,
                    "message": (
                        f"The training was started {job.attempts - 1} times and its worker was lost each time; see the "
                        "job's events, and the workers' logs."
                    ),
                },
            )
            return
        self.executor.forget(job)
        try:
            run = self.executor.start(job, self.name)
        except Exception as exc:
            log.exception("job %s: the executor did not start it", job.id)
            self._end(
                job,
                "failed",
                {
                    "code": "executor_error",
                    "param": None,
                    "message": f"The {self.executor.kind} executor could not start the job: {exc}",
                },
            )
            return
        self.jobs.update(job.id, self.name, executor_ref=run.ref)
        self.runs[job.id] = run
        log.info("job %s: started (%s, attempt %d)", job.id, run.ref, job.attempts)
        thread = threading.Thread(target=self.watch, args=(job, run), name=f"job-{job.id}", daemon=True)
        self.running[job.id] = thread
        thread.start()

    def watch(self, job: Job, run: Run) -> None:
        """Renew the job's lease while it trains; stop it when it is no longer ours; end it if the training
        ended without doing so."""
        try:
            self._watch(job, run)
        finally:
            self.runs.pop(job.id, None)

    def _watch(self, job: Job, run: Run) -> None:
        settings = self.settings
        renewed = time.monotonic()
        while (code := run.exit_code()) is None:
            if time.monotonic() - renewed >= settings.job_heartbeat_s:
                renewed = time.monotonic()
                if self.jobs.heartbeat(job.id, self.name, settings.job_lease_s) is None:
                    log.info("job %s: no longer this worker's (cancelled?): stopping its training", job.id)
                    run.stop()
                    code = run.exit_code()
                    break
            time.sleep(0.5)
        current = self.jobs.get(None, job.id)
        if current.status == "cancelled":
            shutil.rmtree(settings.jobs_root / job.id, ignore_errors=True)
        elif current.status == "running" and current.worker == self.name:  # the training ended, saying nothing
            tail = run.log_tail().strip().splitlines()[-5:]
            self._end(
                current,
                "failed",
                {
                    "code": "training_died",
                    "param": None,
                    "message": (
                        f"The training process ended with status {code} before finishing; the end of its log: "
                        + " | ".join(tail)
                    ),
                },
            )
        log.info("job %s: %s", job.id, current.status)
