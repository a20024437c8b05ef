"""The state database's schema: Alembic migrations, applied at start and by `lorafleet db upgrade`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from serving.state.db import current, head, state_engine, upgrade
from serving.state.tables import metadata
from serving.state.tenants import TenantStore
from tests.conftest import ROOT


def test_the_migrations_build_exactly_the_schema_the_code_uses(tmp_path: Path) -> None:
    engine = state_engine(f"sqlite:///{tmp_path / 'state.db'}")
    assert current(engine) is None
    assert upgrade(engine) == head() == current(engine)
    with engine.connect() as db:
        diffs = compare_metadata(MigrationContext.configure(db), metadata)
    assert diffs == []  # a model change without its migration fails here
    assert upgrade(engine) == head()  # and again: nothing to do


def test_the_one_metadata_holds_every_table_whatever_was_imported_first() -> None:
    """Alembic's target and the adoption of an old database read ``serving.state.tables`` alone: no table may
    depend on some other module having been imported before."""
    code = "from serving.state.tables import metadata; print(sorted(metadata.tables))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    expected = [
        "adapter_events",
        "adapter_retired",
        "adapter_stable",
        "alias_policies",
        "api_keys",
        "canaries",
        "canary_events",
        "canary_windows",
        "files",
        "fine_tuning_checkpoints",
        "fine_tuning_events",
        "fine_tuning_jobs",
        "fine_tuning_workers",
        "grants",
        "tenants",
    ]
    assert eval(proc.stdout) == expected


def test_two_active_canaries_of_one_alias_are_resolved_by_the_migration(tmp_path: Path) -> None:
    """Before 0005 two gateways could both start a canary for one alias; upgrading keeps the newest, aborts
    the older with an event, and from then on the database refuses a second active canary."""
    from alembic import command

    from serving.canary.analysis import CanaryConfig
    from serving.canary.state import CanaryError
    from serving.state.canaries import CanaryRecords
    from serving.state.db import _config

    engine = state_engine(f"sqlite:///{tmp_path / 'state.db'}")
    with engine.begin() as db:
        command.upgrade(_config(db), "0004")
        for candidate in (2, 3):
            db.execute(
                sa.text(
                    "INSERT INTO canaries (alias, candidate, stable, state, step, config, forced, "
                    "step_started_at, created_at) VALUES ('orders', :c, 1, 'running', 0, '{}', 0, 0, 0)"
                ),
                {"c": candidate},
            )
    assert upgrade(engine) == head()
    with engine.connect() as db:
        states = db.execute(sa.text("SELECT candidate, state FROM canaries ORDER BY id")).all()
        events = db.execute(sa.text("SELECT canary_id, action, actor FROM canary_events")).all()
    assert [tuple(r) for r in states] == [(2, "aborted"), (3, "running")]
    assert [tuple(r) for r in events] == [(1, "abort", "migration")]
    with pytest.raises(CanaryError) as refused:
        CanaryRecords(engine).insert("orders", 4, 1, CanaryConfig(), forced=False)
    assert (refused.value.status, refused.value.code) == (409, "canary_exists")
    CanaryRecords(engine).insert("other", 2, 1, CanaryConfig(), forced=False)  # another alias: fine


def test_a_database_from_before_migrations_is_adopted_with_its_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    old = sa.create_engine(url)
    with old.begin() as db:  # an early release's tables: no limits, no default alias, no key ids, no canaries
        db.execute(
            sa.text(
                "CREATE TABLE tenants (id INTEGER PRIMARY KEY, name VARCHAR(64) UNIQUE NOT NULL, "
                "disabled BOOLEAN NOT NULL, created_at DATETIME NOT NULL)"
            )
        )
        db.execute(
            sa.text(
                "CREATE TABLE api_keys (id INTEGER PRIMARY KEY, tenant_id INTEGER NOT NULL "
                "REFERENCES tenants(id) ON DELETE CASCADE, key_hash VARCHAR(64) UNIQUE NOT NULL, "
                "created_at DATETIME NOT NULL, revoked_at DATETIME)"
            )
        )
        db.execute(
            sa.text(
                "CREATE TABLE grants (tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,"
                " alias VARCHAR(64) NOT NULL, PRIMARY KEY (tenant_id, alias))"
            )
        )
        db.execute(sa.text("INSERT INTO tenants VALUES (1, 'acme', 0, '2026-01-01 00:00:00')"))
        db.execute(sa.text("INSERT INTO grants VALUES (1, 'orders')"))
    old.dispose()
    store = TenantStore(url)
    assert current(store.engine) == head()
    acme = store.require("acme")
    assert acme.aliases == frozenset({"orders"}) and acme.limits.max_tokens is None
    key = store.issue_key(acme)
    assert store.authenticate(key) == store.require("acme")


def test_the_cli_reports_and_applies_the_migrations(tmp_path: Path) -> None:
    env = os.environ | {"LORAFLEET_DATA_DIR": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lorafleet", "db", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    before = cli("current")
    assert before.returncode == 1 and "no migration applied" in before.stdout
    applied = cli("upgrade")
    assert applied.returncode == 0 and f"upgraded from nothing to revision {head()}" in applied.stdout
    assert cli("upgrade").stdout.strip() == f"state database already at revision {head()}"
    assert cli("current").returncode == 0
