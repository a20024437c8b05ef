"""The state database as of the first migration: tenants, keys, grants, alias policies, canaries and their events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), unique=True, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("default_alias", sa.String(64), nullable=True),
        sa.Column("requests_per_minute", sa.Integer, nullable=True),
        sa.Column("max_concurrent", sa.Integer, nullable=True),
        sa.Column("max_tokens", sa.Integer, nullable=True),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("key_hash", sa.String(64), unique=True, nullable=False),
        sa.Column("key_id", sa.String(16), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "grants",
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("alias", sa.String(64), primary_key=True),
    )
    op.create_table(
        "alias_policies",
        sa.Column("alias", sa.String(64), primary_key=True),
        sa.Column("json_mode", sa.String(16), nullable=True),
        sa.Column("default_schema", sa.Text, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "canaries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("alias", sa.String(64), nullable=False, index=True),
        sa.Column("candidate", sa.Integer, nullable=False),
        sa.Column("stable", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("forced", sa.Boolean, nullable=False),
        sa.Column("step_started_at", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_analysis", sa.Text, nullable=True),
    )
    op.create_table(
        "canary_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "canary_id", sa.Integer, sa.ForeignKey("canaries.id", ondelete="CASCADE"), nullable=False, index=True
        ),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("numbers", sa.Text, nullable=True),
        sa.Column("actor", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    for table in ("canary_events", "canaries", "alias_policies", "grants", "api_keys", "tenants"):
        op.drop_table(table)
