"""The adapter store's ledger in the database (PostgreSQL fleets): stable pointers, retired versions, audit events.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    have = set(sa.inspect(op.get_bind()).get_table_names())
    if "adapter_stable" not in have:
        op.create_table(
            "adapter_stable",
            sa.Column("alias", sa.String(64), primary_key=True),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("changed_at", sa.Float, nullable=False),
        )
    if "adapter_retired" not in have:
        op.create_table(
            "adapter_retired",
            sa.Column("alias", sa.String(64), primary_key=True),
            sa.Column("version", sa.Integer, primary_key=True),
            sa.Column("at", sa.Float, nullable=False),
        )
    if "adapter_events" not in have:
        op.create_table(
            "adapter_events",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("alias", sa.String(64), nullable=False, index=True),
            sa.Column("at", sa.Float, nullable=False),
            sa.Column("action", sa.String(16), nullable=False),
            sa.Column("from_version", sa.Integer, nullable=True),
            sa.Column("to_version", sa.Integer, nullable=False),
            sa.Column("forced", sa.Boolean, nullable=False),
            sa.Column("gate_passed", sa.Boolean, nullable=True),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("actor", sa.String(64), nullable=False),
        )


def downgrade() -> None:
    op.drop_table("adapter_events")
    op.drop_table("adapter_retired")
    op.drop_table("adapter_stable")
