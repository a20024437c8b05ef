"""``lorafleet worker`` and ``lorafleet jobs``: run fine-tuning jobs, and look after them as an operator.

    lorafleet worker                      take jobs from the state database and train them (Ctrl-C: the
                                          trainings under way checkpoint and go back to the queue)
    lorafleet jobs list [--status S]      every tenant's jobs, newest first
    lorafleet jobs show JOB               one job, as the API shows it
    lorafleet jobs events JOB             its events, oldest first
    lorafleet jobs cancel JOB             cancel it (any tenant's)

They read and write the state database directly (``LORAFLEET_DATABASE_URL``),
like the admin API's ``/admin/fine_tuning/jobs`` routes do.
"""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from contract.settings import CommonSettings
from lorafleet.console import console, fail

app = typer.Typer(no_args_is_help=True, help="Fine-tuning jobs, for operators (every tenant's).")


def worker() -> None:
    """Take fine-tuning jobs from the state database and train them (settings: LORAFLEET_EXECUTOR, ...)."""
    import logging

    from finetune.settings import WorkerSettings
    from finetune.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = WorkerSettings()
        running = Worker(settings)
    except Exception as exc:  # a bad setting, an unreachable Ray cluster: said, not a traceback
        raise fail(f"the worker cannot start: {exc}") from exc

    def stop(signum: int, _frame: Any) -> None:
        running.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    console.print(f"worker {running.name}: {settings.executor} executor; Ctrl-C stops it", highlight=False)
    running.run()
    running.stop()


def _store() -> Any:
    from serving.state.db import state_engine
    from serving.state.jobs import JobStore

    return JobStore(state_engine(CommonSettings().state_url))


def _when(ts: int | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _tenant_names() -> dict[int, str]:
    from serving.state.tenants import TenantStore

    return {t.id: t.name for t in TenantStore(CommonSettings().state_url).all()}


@app.command("list")
def jobs_list(
    status: Annotated[list[str] | None, typer.Option(help="Only jobs in this status (repeatable).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
) -> None:
    """Every tenant's jobs, newest first."""
    from rich.table import Table

    jobs, more = _store().page(None, limit=limit, statuses=tuple(status or ()))
    names = _tenant_names()
    table = Table("job", "tenant", "status", "model", "fine-tuned model", "created", "step", title_justify="left")
    for job in jobs:
        progress = job.progress or {}
        step = f"{progress.get('step')}/{progress.get('total_steps')}" if progress else "-"
        table.add_row(
            job.id,
            names.get(job.tenant_id, str(job.tenant_id)),
            job.status,
            job.model,
            job.fine_tuned_model or "-",
            _when(job.created_at),
            step,
        )
    console.print(table)
    if more:
        console.print(f"(more than {limit}: --limit)")


@app.command("show")
def jobs_show(job_id: str) -> None:
    """One job, as the API shows it (JSON)."""
    from serving.state.jobs import JobNotFound

    try:
        job = _store().get(None, job_id)
    except JobNotFound as exc:
        raise fail(str(exc)) from exc
    console.print_json(json.dumps(job.as_openai(_tenant_names().get(job.tenant_id, ""))))


@app.command("events")
def jobs_events(job_id: str, limit: Annotated[int, typer.Option(help="The newest N.")] = 100) -> None:
    """The job's events, oldest first."""
    from serving.state.jobs import JobError

    try:
        events, _ = _store().events(None, job_id, None, limit)
    except JobError as exc:
        raise fail(str(exc)) from exc
    for event in reversed(events):
        console.print(f"{_when(event['created_at'])} {event['level']:5} {event['message']}", highlight=False)


@app.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Cancel a job, whichever tenant's (its worker stops the training within seconds)."""
    from serving.state.jobs import JobError

    try:
        job = _store().cancel(None, job_id)
    except JobError as exc:
        raise fail(str(exc)) from exc
    console.print(f"{job.id}: {job.status}", highlight=False)
