"""Where a job's training runs: ``local`` (a child process of the worker) or ``ray`` (a Ray cluster).

Both start the same program, ``python -m finetune.runner --job ID --worker NAME``,
with the service's settings in its environment; the runner reads and writes the
job itself (``finetune.runner``). An executor only starts it, says whether it
is still running, stops it, and shows the end of its log.

``ray`` submits through Ray's Job Submission SDK
(``ray.job_submission.JobSubmissionClient``) to the dashboard address of an
existing cluster (KubeRay's ``RayCluster``, or ``ray start --head``): the
entrypoint, its resources (``LORAFLEET_RAY_RESOURCES``: CPUs, GPUs, memory)
and a runtime environment carrying the settings. The cluster's nodes need
lorafleet installed (the same image) and the shared folders mounted at the
same paths: files, jobs and the adapter store.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from finetune.settings import WorkerSettings
from serving.state.jobs import Job

LOG_TAIL = 4000
TRAIN_LOG = "train.log"  # a local job's training log, in its work folder
PARENT_ENV, NICE_ENV = "LORAFLEET_RUNNER_PARENT", "LORAFLEET_RUNNER_NICE"


def runner_command(job: Job, worker: str) -> list[str]:
    return ["-m", "finetune.runner", "--job", job.id, "--worker", worker]


def runner_env(settings: WorkerSettings) -> dict[str, str]:
    """The settings a runner needs, with every path absolute (it may start in another folder, or machine)."""
    env = {
        "LORAFLEET_DATA_DIR": str(settings.data_dir.resolve()),
        "LORAFLEET_FILES_DIR": str(settings.files_root.resolve()),
        "LORAFLEET_JOBS_DIR": str(settings.jobs_root.resolve()),
        "LORAFLEET_DATABASE_URL": _absolute_url(settings.state_url),
        "LORAFLEET_MAX_LORA_RANK": str(settings.max_lora_rank),
        # the gate's engine enforces JSON as the serving engines do
        "LORAFLEET_JSON_BACKEND": settings.json_backend,
        "LORAFLEET_JSON_WHITESPACE": settings.json_whitespace,
        "LORAFLEET_LORA_OPS": settings.lora_ops,
        "LORAFLEET_BASE_MODEL": settings.base_model,
        "LORAFLEET_JOB_SAVE_EVERY": str(settings.job_save_every),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    return env


def _absolute_url(url: str) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


class Run(Protocol):
    """One started training."""

    @property
    def ref(self) -> str:
        """What the executor calls it: a process id, a Ray submission id."""

    def exit_code(self) -> int | None:
        """``None`` while it runs; then its exit status (Ray: 0 when it succeeded, 1 otherwise)."""

    def stop(self) -> None:
        """Stop it now (a cancel: no checkpoint is needed)."""

    def interrupt(self) -> None:
        """Ask it to stop after its current step with a checkpoint (its worker is stopping)."""

    def log_tail(self) -> str: ...


class Executor(Protocol):
    kind: str

    def start(self, job: Job, worker: str) -> Run: ...

    def forget(self, job: Job) -> None:
        """Stop what an earlier attempt of ``job`` may have left running (its worker died)."""


@dataclass
class LocalRun:
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def ref(self) -> str:
        return f"pid:{self.process.pid}"

    def exit_code(self) -> int | None:
        return self.process.poll()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def interrupt(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def log_tail(self) -> str:
        return _tail(self.log_path)


class LocalExecutor:
    """The training as a child process of the worker: its own process group, at low priority, and killed by the
    kernel if the worker dies (the job's lease then runs out and another worker resumes it)."""

    kind = "local"

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings

    def start(self, job: Job, worker: str) -> Run:
        work = self.settings.jobs_root / job.id
        work.mkdir(parents=True, exist_ok=True)
        log_path = work / TRAIN_LOG
        # The runner lowers its own priority and ties its life to this process (``finetune.runner.bind``): a
        # preexec_fn would run in a process forked from one with threads.
        env = (
            os.environ
            | runner_env(self.settings)
            | {PARENT_ENV: str(os.getpid()), NICE_ENV: str(self.settings.job_nice)}
        )
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, *runner_command(job, worker)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                process_group=0,  # the worker's Ctrl-C is the worker's to handle; a cancel kills the whole group
            )
        return LocalRun(process, log_path)

    def forget(self, job: Job) -> None:
        """A local run of a dead worker died with it (``PR_SET_PDEATHSIG``): nothing to stop."""


def bind_to_parent() -> None:
    """In a runner a local worker started: lower its priority, and die with the worker (Linux's
    ``PR_SET_PDEATHSIG``), so that a killed worker's job is resumed elsewhere, not trained twice."""
    parent = os.environ.get(PARENT_ENV)
    if parent is None:
        return
    os.nice(int(os.environ.get(NICE_ENV, "0")))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != int(parent):  # the worker died before the line above
        os._exit(1)


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - LOG_TAIL))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


class RayRun:
    def __init__(self, client: Any, submission_id: str) -> None:
        self.client, self.ref = client, submission_id

    def exit_code(self) -> int | None:
        from ray.job_submission import JobStatus

        status = self.client.get_job_status(self.ref)
        if not status.is_terminal():
            return None
        return 0 if status == JobStatus.SUCCEEDED else 1

    def stop(self) -> None:
        self.client.stop_job(self.ref)
        _wait_terminal(self.client, self.ref)

    def interrupt(self) -> None:
        """A Ray job outlives its worker: its lease runs out and the next worker takes it over (``forget``)."""

    def log_tail(self) -> str:
        try:
            return str(self.client.get_job_logs(self.ref))[-LOG_TAIL:]
        except Exception:  # logs are a courtesy: a cluster that cannot give them does not fail the job
            return ""


class RayExecutor:
    """Each job submitted to an existing Ray cluster through the Job Submission SDK."""

    kind = "ray"

    def __init__(self, settings: WorkerSettings) -> None:
        from ray.job_submission import JobSubmissionClient

        self.settings = settings
        self.client = JobSubmissionClient(settings.ray_address)

    def start(self, job: Job, worker: str) -> Run:
        resources = dict(self.settings.ray_resources)
        runtime_env = dict(self.settings.ray_runtime_env)
        runtime_env["env_vars"] = dict(runtime_env.get("env_vars", {})) | runner_env(self.settings)
        submission_id = f"lorafleet-{job.id}-{secrets.token_hex(4)}"  # one per start: a resume submits anew
        self.client.submit_job(
            entrypoint=" ".join(["python", *runner_command(job, worker)]),
            submission_id=submission_id,
            runtime_env=runtime_env,
            metadata={"lorafleet_job": job.id, "worker": worker},
            entrypoint_num_cpus=resources.get("num_cpus"),
            entrypoint_num_gpus=resources.get("num_gpus"),
            entrypoint_memory=resources.get("memory"),
            entrypoint_resources=resources.get("resources"),
        )
        return RayRun(self.client, submission_id)

    def forget(self, job: Job) -> None:
        """Stop the Ray job an earlier attempt submitted (its worker died; Ray kept it running)."""
        if job.executor == "ray" and job.executor_ref:
            try:
                self.client.stop_job(job.executor_ref)
                _wait_terminal(self.client, job.executor_ref)
            except Exception:  # already gone, or never submitted
                pass


def _wait_terminal(client: Any, submission_id: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not client.get_job_status(submission_id).is_terminal():
        time.sleep(0.5)


def executor_for(settings: WorkerSettings) -> Executor:
    if settings.executor == "ray":
        return RayExecutor(settings)
    return LocalExecutor(settings)
