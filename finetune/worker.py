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
from pathlib import Path
from typing import Any

from finetune.executors import TRAIN_LOG, Executor, Run, executor_for
from finetune.settings import WorkerSettings
from finetune.validate import check_file, described, file_error
from serving.state.db import state_engine
from serving.state.files import FileNotFound, FileStore
from serving.state.jobs import JOB_PREFIX, Job, JobNotFound, JobStateError, JobStore

log = logging.getLogger("lorafleet.worker")
SWEEP_S = 60.0  # how often ended jobs' work folders are cleaned
LOG_KEPT_S = 7 * 86400.0  # an ended job's training log is kept this long
PARENT_ENV = "LORAFLEET_WORKER_PARENT"  # set by `lorafleet serve`: the worker stops when that process is gone
VALIDATION_LEASES = 10  # a file check's lease: this many job leases


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
        self._swept = 0.0

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
        parent = os.environ.get(PARENT_ENV)
        if parent and os.getppid() != int(parent):  # started by `lorafleet serve`, which is gone: stop too
            log.warning("worker %s: the process that started it is gone; stopping", self.name)
            self.stopping.set()
            return False
        self.running = {k: t for k, t in self.running.items() if t.is_alive()}
        self.jobs.beat(self.name, self.executor.kind, ",".join(sorted(self.running)) or None)
        for job_id in self.jobs.expired():
            log.warning("job %s: its worker stopped renewing the lease; queued again", job_id)
        if time.monotonic() - self._swept >= SWEEP_S:
            self._swept = time.monotonic()
            self.sweep()
        busy = False
        # Validation reads a whole file (up to the files' size limit): a long lease, so that a slow check is
        # not taken over by another worker halfway.
        lease = self.settings.job_lease_s * VALIDATION_LEASES
        validating = self.jobs.claim(self.name, "validating_files", lease, self.executor.kind)
        if validating is not None:
            self.validate(validating)
            busy = True
        if len(self.running) < self.settings.worker_slots and not self.stopping.is_set():
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
                message = f"{param} {file_id} was deleted before the job started; upload it again and create a new job."
                self._end(job, "failed", {"code": "file_deleted", "param": param, "message": message})
                return
            except (OSError, UnicodeDecodeError) as exc:
                message = f"{param} {file_id} cannot be read as UTF-8 text ({type(exc).__name__})."
                self._end(job, "failed", {"code": "invalid_file", "param": param, "message": message})
                return
            except Exception:  # a file the checker cannot take (nested too deep, ...): the job fails, not the worker
                log.exception("job %s: %s %s could not be checked", job.id, param, file_id)
                message = f"{param} {file_id} could not be checked: write one JSON object per line, nested plainly."
                self._end(job, "failed", {"code": "invalid_file", "param": param, "message": message})
                return
            if report.errors:
                self._end(job, "failed", file_error(report, file_id, param))
                return
            for warning in described(report.warnings, file_id):
                self.jobs.add_event(job.id, f"{param}: {warning}", level="warn")
            counts.append(f"{param} {file_id}: {len(report.examples)} examples from {report.rows} rows")
        message = "Files validated (" + "; ".join(counts) + "). Job queued."
        self.jobs.release(job.id, str(job.worker), "queued", message)

    def _end(self, job: Job, status: Any, error: dict[str, Any]) -> None:
        """End a job this worker holds (as ``failed``, with ``error``) and remove its work folder."""
        try:
            with self.jobs.finishing(job.id, str(job.worker), status, error=error):
                pass
        except JobStateError:
            return
        self.jobs.add_event(job.id, f"Fine-tuning job failed: {error['message']}", level="error")
        clean_work(self.settings.jobs_root / job.id)

    def start(self, job: Job) -> None:
        if job.attempts >= self.settings.job_attempts:
            message = (
                f"Its worker was lost {job.attempts} times during the training; an operator can read why in the "
                f"workers' logs (job {job.id})."
            )
            self._end(job, "failed", {"code": "too_many_attempts", "param": None, "message": message})
            return
        self.executor.forget(job)
        try:
            run = self.executor.start(job, str(job.worker))
        except Exception:
            log.exception("job %s: the executor did not start it", job.id)
            message = f"The {self.executor.kind} executor could not start the training (job {job.id}); retry later."
            self._end(job, "failed", {"code": "executor_error", "param": None, "message": message})
            return
        self.jobs.update(job.id, str(job.worker), executor_ref=run.ref)
        self.runs[job.id] = run
        log.info("job %s: started (%s)", job.id, run.ref)
        thread = threading.Thread(target=self.watch, args=(job, run), name=f"job-{job.id}", daemon=True)
        self.running[job.id] = thread
        thread.start()

    def watch(self, job: Job, run: Run) -> None:
        """Renew the job's lease while it trains; stop it when it is no longer ours; end it if the training
        ended without doing so."""
        try:
            self._watch(job, run)
        except Exception:  # the thread must not end with the training running unwatched
            log.exception(
                "job %s: watching its training failed; stopping it (its lease lets another resume it)", job.id
            )
            run.stop()
        finally:
            self.runs.pop(job.id, None)

    def _watch(self, job: Job, run: Run) -> None:
        settings, holder = self.settings, str(job.worker)
        renewed = started = time.monotonic()
        while (code := run.exit_code()) is None:
            if time.monotonic() - renewed >= settings.job_heartbeat_s:
                renewed = time.monotonic()
                try:
                    held = self.jobs.heartbeat(job.id, holder, settings.job_lease_s) is not None
                except Exception:  # the database is away: keep training; a lapsed lease is noticed when it is back
                    log.warning("job %s: its lease could not be renewed this time", job.id, exc_info=True)
                    held = True
                if not held:
                    now = self.jobs.get(None, job.id)
                    if now.status in ("succeeded", "failed", "paused"):
                        continue  # its runner ended it (published, failed, paused): it is exiting on its own
                    log.info("job %s: no longer this worker's (%s): stopping its training", job.id, now.status)
                    run.stop()
                    code = run.exit_code()
                    break
            if settings.job_timeout_s and time.monotonic() - started > settings.job_timeout_s:
                # Ended first, stopped after: a runner mid-publish holds the row, and this end then does nothing.
                message = f"The training took longer than the service's limit of {settings.job_timeout_s:.0f} s."
                self._end(job, "failed", {"code": "timeout", "param": None, "message": message})
                run.stop()
                return
            time.sleep(0.5)
        current = self.jobs.get(None, job.id)
        if current.status == "cancelled":
            shutil.rmtree(settings.jobs_root / job.id, ignore_errors=True)
        elif current.status == "failed":  # the tenant is pointed at the operators: the reason is in this log
            log.error("job %s failed (%s); the end of its training log:\n%s", job.id, current.error, run.log_tail())
        elif current.status == "running" and current.worker == holder:  # the training ended, saying nothing
            log.error(
                "job %s: the training ended with status %s; the end of its log:\n%s", job.id, code, run.log_tail()
            )
            if self.stopping.is_set():  # stopped with this worker before it could checkpoint: queued again
                self.jobs.release(job.id, holder, "queued", f"Worker {self.name} stopped; the job is queued again.")
            else:
                message = (
                    f"The training process ended with status {code} before finishing (out of memory?); an operator "
                    f"can read why in the worker's log (job {job.id})."
                )
                self._end(current, "failed", {"code": "training_died", "param": None, "message": message})
        log.info("job %s: %s", job.id, self.jobs.get(None, job.id).status)

    def sweep(self) -> None:
        """Remove what ended jobs left (a cancel of a paused job, a job failed anywhere): their checkpoints at
        once, their training logs after ``LOG_KEPT_S``. Only folders named like jobs are touched."""
        root = self.settings.jobs_root
        if not root.is_dir():
            return
        for folder in root.iterdir():
            if not folder.name.startswith(JOB_PREFIX) or not folder.is_dir():
                continue
            try:
                status = self.jobs.get(None, folder.name).status
            except JobNotFound:
                status = "gone"
            if status not in ("succeeded", "failed", "cancelled", "gone"):
                continue
            clean_work(folder)
            if time.time() - folder.stat().st_mtime > LOG_KEPT_S:
                shutil.rmtree(folder, ignore_errors=True)


def clean_work(folder: Path) -> None:
    """A job's work folder once the job has ended: everything but its training log (what operators read)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name == TRAIN_LOG:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
