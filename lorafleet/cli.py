"""The ``lorafleet`` command line: one Typer sub-app per command group, each in ``lorafleet/commands/``.

    lorafleet model pull          provision the base model (offline-safe, idempotent)
    lorafleet data ...            write the demo datasets, check a training file
    lorafleet train ...           fine-tune a LoRA adapter (and publish it)
    lorafleet eval ...            score base and adapters on held-out data; gate a version
    lorafleet export ...          merge an adapter into its base model
    lorafleet adapters ...        publish, list, promote, retire versions; an alias's JSON policy
    lorafleet tenants ...         create tenants, grant aliases, set limits, issue keys
    lorafleet canary ...          canary rollouts on a running gateway
    lorafleet db ...              the state database's schema (Alembic migrations)
    lorafleet worker              run fine-tuning jobs (local child processes, or a Ray cluster)
    lorafleet jobs ...            every tenant's fine-tuning jobs: list, show, events, cancel
    lorafleet engines             the engines behind the running gateway: health, load, adapters
    lorafleet report              latency and validity per alias from Prometheus
    lorafleet serve               run the gateway (starts vLLM)
    lorafleet serve-engine        run one vLLM engine for a fleet of gateways (a Kubernetes engine pod)
    lorafleet demo                serve the demo, training its adapters behind it (``make run``)

Each command imports its component only when it runs, so ``serve`` never loads torch.
"""

from __future__ import annotations

import os

import typer

from lorafleet.commands import (
    adapters,
    canary,
    data,
    db,
    demo,
    engines,
    evaluate,
    export,
    jobs,
    model,
    report,
    serve,
    ship,
    tenants,
    train,
)

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Fine-tune LoRA adapters and serve them on vLLM.")
app.add_typer(model.app, name="model")
app.add_typer(data.app, name="data")
app.add_typer(adapters.app, name="adapters")
app.add_typer(tenants.app, name="tenants")
app.add_typer(canary.app, name="canary")
app.add_typer(db.app, name="db")
app.add_typer(jobs.app, name="jobs")
app.command(name="train")(train.train)
app.command(name="eval")(evaluate.eval_)
app.command(name="export")(export.export)
app.command(name="report")(report.report)
app.command(name="engines")(engines.engines)
app.command(name="serve")(serve.serve)
app.command(name="serve-engine")(serve.serve_engine)
app.command(name="demo")(demo.demo)
app.command(name="worker")(jobs.worker)
app.command(name="ship")(ship.ship)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
