"""The state database (tenants, keys, grants, alias policies, canaries): its engine and its schema.

SQLite on one machine (the default, ``data_dir/state.db``), PostgreSQL for a
fleet of gateways (``LORAFLEET_DATABASE_URL=postgresql+psycopg://...``). The schema
is managed by Alembic migrations (``serving/state/migrations``): ``upgrade`` applies
the missing ones, at start and with ``lorafleet db upgrade``. On PostgreSQL it
holds an advisory lock for its transaction, so replicas starting together never
race on a schema change. A database made before migrations existed (tables, no
``alembic_version``) is adopted: its missing tables and columns are added, and
it is stamped at the baseline revision.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from serving.state.tables import metadata

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
# pg_advisory_xact_lock's key for schema changes: any fixed 64-bit number, the same in every replica.
SCHEMA_LOCK = 0x6C6F7261666C6565  # "lorafle(e)"


class StateUnavailable(Exception):
    """The state database has not answered for a while: a read is refused at once rather than tried again
    (``serving.state.cache``)."""


# What is raised when the database does not answer (down, restarting, unreachable): the gateway answers 503
# state_unavailable to a request that needed it (serving.http.errors).
UNREACHABLE: tuple[type[Exception], ...] = (sa.exc.OperationalError, sa.exc.InterfaceError, StateUnavailable)

_upgraded: set[str] = set()  # database URLs this process has brought to the newest revision
_lock = threading.Lock()


def state_engine(url: str) -> sa.Engine:
    """The state database's engine. SQLite runs in WAL mode with a busy timeout: the gateway's threads, its
    canary loop and the CLI all write the same file, and readers should never wait for a writer."""
    if not url.startswith("sqlite"):  # PostgreSQL: a dead connection is replaced, an unreachable server fails fast
        return sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    engine = sa.create_engine(url, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine


def _config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision this release knows."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return str(ScriptDirectory.from_config(config).get_current_head())


def current(engine: sa.Engine) -> str | None:
    """The database's revision (``None``: no migration applied yet)."""
    with engine.connect() as db:
        return MigrationContext.configure(db).get_current_revision()


def upgrade(engine: sa.Engine) -> str:
    """Apply the missing migrations (one transaction; on PostgreSQL under the schema advisory lock)."""
    with engine.begin() as db:
        if db.dialect.name == "postgresql":
            db.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
        config = _config(db)
        if MigrationContext.configure(db).get_current_revision() is None and sa.inspect(db).has_table("tenants"):
            _adopt(db)
            command.stamp(config, BASELINE)
        command.upgrade(config, "head")
    return head()


def ensure_schema(engine: sa.Engine) -> None:
    """``upgrade`` once per database per process (every store opening the database calls it)."""
    url = engine.url.render_as_string(hide_password=False)
    with _lock:
        if url not in _upgraded:
            upgrade(engine)
            _upgraded.add(url)


def _adopt(db: sa.Connection) -> None:
    """A database made before migrations: the baseline's missing tables and nullable columns, added in place."""
    metadata.create_all(db)
    inspector = sa.inspect(db)
    for table in metadata.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have and column.nullable:
                kind = column.type.compile(dialect=db.dialect)
                db.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
