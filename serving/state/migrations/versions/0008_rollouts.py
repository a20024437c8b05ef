"""Rollouts: a job into an alias carries its gate and canary's progress; an alias has an admin-set rollout policy.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    jobs = {c["name"] for c in inspector.get_columns("fine_tuning_jobs")}
    if "rollout" not in jobs:  # a database adopted from the metadata has them already
        op.add_column("fine_tuning_jobs", sa.Column("rollout", sa.Text, nullable=True))
        op.add_column("fine_tuning_jobs", sa.Column("rollout_state", sa.String(16), nullable=True))
        op.create_index("ix_jobs_rollout_state", "fine_tuning_jobs", ["rollout_state"])
    if "rollout" not in {c["name"] for c in inspector.get_columns("alias_policies")}:
        op.add_column("alias_policies", sa.Column("rollout", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("alias_policies", "rollout")
    op.drop_index("ix_jobs_rollout_state", table_name="fine_tuning_jobs")
    op.drop_column("fine_tuning_jobs", "rollout_state")
    op.drop_column("fine_tuning_jobs", "rollout")
