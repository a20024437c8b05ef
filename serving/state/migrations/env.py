"""Alembic's environment for the state database: run on the connection ``serving.state.db.upgrade`` passes."""

from __future__ import annotations

from alembic import context

from serving.state.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
