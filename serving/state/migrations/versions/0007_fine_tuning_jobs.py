"""Fine-tuning jobs, their events, checkpoints and workers; per-tenant job limits.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TABLES = ("fine_tuning_jobs", "fine_tuning_events", "fine_tuning_checkpoints", "fine_tuning_workers")


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    columns = {c["name"] for c in inspector.get_columns("tenants")}
    for name in ("running_jobs", "queued_jobs"):
        if name not in columns:  # a database adopted from the metadata has them already
            op.add_column("tenants", sa.Column(name, sa.Integer, nullable=True))
    if "fine_tuning_jobs" in inspector.get_table_names():
        return
    op.create_table(
        "fine_tuning_jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("base_model", sa.String(512), nullable=False),
        sa.Column("parent", sa.String(64), nullable=True),
        sa.Column("training_file", sa.String(40), nullable=False),
        sa.Column("validation_file", sa.String(40), nullable=True),
        sa.Column("suffix", sa.String(64), nullable=True),
        sa.Column("seed", sa.BigInteger, nullable=False),
        sa.Column("hyperparameters", sa.Text, nullable=False),
        sa.Column("options", sa.Text, nullable=False),
        sa.Column("metadata", sa.Text, nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("started_at", sa.BigInteger, nullable=True),
        sa.Column("finished_at", sa.BigInteger, nullable=True),
        sa.Column("estimated_finish", sa.BigInteger, nullable=True),
        sa.Column("fine_tuned_model", sa.String(64), nullable=True),
        sa.Column("trained_tokens", sa.BigInteger, nullable=True),
        sa.Column("result_files", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("progress", sa.Text, nullable=True),
        sa.Column("desired", sa.String(16), nullable=True),
        sa.Column("worker", sa.String(128), nullable=True),
        sa.Column("lease_until", sa.Float, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),  # its worker lost mid-training
        sa.Column("executor", sa.String(16), nullable=True),
        sa.Column("executor_ref", sa.String(128), nullable=True),
        sa.Column("queued_at", sa.Float, nullable=True),
        sa.Column("reported", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_jobs_tenant_created", "fine_tuning_jobs", ["tenant_id", "created_at", "id"])
    op.create_index("ix_jobs_status", "fine_tuning_jobs", ["status", "created_at"])
    op.create_table(
        "fine_tuning_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", sa.Text, nullable=True),
    )
    op.create_index("ix_job_events_job", "fine_tuning_events", ["job_id", "id"])
    op.create_table(
        "fine_tuning_checkpoints",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.UniqueConstraint("job_id", "step", name="uq_job_checkpoint_step"),
    )
    op.create_table(
        "fine_tuning_workers",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("executor", sa.String(16), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("jobs", sa.Text, nullable=True),
    )


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table)
    op.drop_column("tenants", "queued_jobs")
    op.drop_column("tenants", "running_jobs")
