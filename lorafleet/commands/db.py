"""``lorafleet db``: the state database's schema (Alembic migrations).

    lorafleet db upgrade      apply the migrations this release has and the database lacks
    lorafleet db current      the database's revision and this release's newest

The gateway applies them at start too (under a PostgreSQL advisory lock, so
replicas never race); run ``upgrade`` yourself to change the schema before
rolling out a release, or to check a database.
"""

from __future__ import annotations

from typing import Any

import typer

from contract.settings import CommonSettings
from lorafleet.console import console, fail

app = typer.Typer(no_args_is_help=True, help="The state database's schema (Alembic migrations).")


def _engine() -> Any:
    from serving.state.db import state_engine

    settings = CommonSettings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return state_engine(settings.state_url)


@app.command("upgrade")
def upgrade() -> None:
    """Apply the missing migrations (one transaction)."""
    from sqlalchemy.exc import SQLAlchemyError

    from serving.state.db import current, upgrade

    engine = _engine()
    before = current(engine)
    try:
        after = upgrade(engine)
    except SQLAlchemyError as exc:
        fail(f"cannot upgrade the state database {engine.url!r}: {exc}")
    what = "already at" if before == after else f"upgraded from {before or 'nothing'} to"
    console.print(f"state database {what} revision {after}", highlight=False)


@app.command("current")
def current() -> None:
    """The database's revision and this release's newest."""
    from serving.state.db import current, head

    engine = _engine()
    revision = current(engine)
    console.print(f"database: {revision or 'no migration applied'}; this release: {head()}", highlight=False)
    if revision != head():
        raise typer.Exit(1)
