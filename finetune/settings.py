"""The worker's settings (``LORAFLEET_*``, like every other): which executor, the lease, Ray's address."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from contract.settings import CommonSettings


class WorkerSettings(CommonSettings):
    executor: Literal["local", "ray"] = Field(
        default="local",
        description="Where jobs train: local (a child process of the worker) or ray (an existing Ray cluster).",
    )
    worker_slots: int = Field(default=1, ge=1, le=64, description="Jobs one worker trains at once.")
    job_lease_s: float = Field(
        default=60.0,
        gt=0,
        description="A running job's lease: a worker that stops renewing it this long (it died) loses the job, "
        "which is queued again and resumes from its last checkpoint.",
    )
    job_heartbeat_s: float = Field(default=5.0, gt=0, description="How often a worker renews its jobs' leases.")
    worker_poll_s: float = Field(default=2.0, gt=0, description="How often an idle worker looks for jobs.")
    job_nice: int = Field(default=10, ge=0, le=19, description="Niceness of a local job's training process.")
    job_attempts: int = Field(
        default=3,
        ge=1,
        le=20,
        description="Workers a job may lose mid-training (each time it resumes from a checkpoint) before it fails.",
    )
    job_timeout_s: float = Field(
        default=86_400.0,
        ge=0,
        description="Longest a job may train (per start); past it the job fails with `timeout`. 0: no limit.",
    )
    job_save_every: int = Field(
        default=50, ge=1, description="Checkpoint every N steps unless the job sets lorafleet.save_every."
    )
    ray_address: str = Field(
        default="http://127.0.0.1:8265", description="The Ray cluster's dashboard address (Job Submission API)."
    )
    ray_resources: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 1},
        description='Resources of each job\'s entrypoint on Ray: {"num_cpus", "num_gpus", "memory", "resources"}.',
    )
    ray_runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description='Ray runtime environment of each job (for example {"pip": [...]}); the job\'s settings are '
        "added to its env_vars.",
    )
