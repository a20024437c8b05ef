"""Canary windows shared by several gateways: each gateway's samples of a step, per variant (compact form).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("canary_windows"):  # a database adopted from before migrations
        return
    op.create_table(
        "canary_windows",
        sa.Column("canary_id", sa.Integer, sa.ForeignKey("canaries.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("window", sa.Float, primary_key=True),
        sa.Column("variant", sa.String(8), primary_key=True),
        sa.Column("replica", sa.String(96), primary_key=True),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("canary_windows")
