"""A tenant's tokens per minute (prompt + completion), beside its requests per minute.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("tenants")}
    if "tokens_per_minute" not in columns:  # a database adopted from before migrations has it already
        op.add_column("tenants", sa.Column("tokens_per_minute", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("tenants", "tokens_per_minute")
