"""Files a tenant uploads through OpenAI's files API (fine-tuning data).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "files" in sa.inspect(op.get_bind()).get_table_names():  # an adopted database made it from the metadata
        return
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_files_tenant_created", "files", ["tenant_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_files_tenant_created", table_name="files")
    op.drop_table("files")
