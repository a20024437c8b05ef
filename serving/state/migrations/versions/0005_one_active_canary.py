"""At most one running or paused canary per alias: a partial unique index, so two gateways starting a canary
for the same alias at the same instant cannot both insert one.

A database where that race already happened keeps the newest active canary of each alias; the older ones are
marked aborted, with an event saying why.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ONE_ACTIVE = sa.text("state IN ('running', 'paused')")


def upgrade() -> None:
    db = op.get_bind()
    if "uq_canaries_active_alias" in {i["name"] for i in sa.inspect(db).get_indexes("canaries")}:
        return  # a database adopted from before migrations: made from today's tables, index included
    active = db.execute(sa.text("SELECT id, alias FROM canaries WHERE state IN ('running', 'paused') ORDER BY id"))
    newest: dict[str, int] = {}
    older: list[tuple[int, str]] = []
    for canary_id, alias in active:
        if alias in newest:
            older.append((newest[alias], alias))
        newest[alias] = canary_id
    for canary_id, alias in older:
        db.execute(sa.text("UPDATE canaries SET state = 'aborted' WHERE id = :id"), {"id": canary_id})
        db.execute(
            sa.text(
                "INSERT INTO canary_events (canary_id, alias, at, action, reason, actor) "
                "VALUES (:id, :alias, :at, 'abort', :reason, 'migration')"
            ),
            {
                "id": canary_id,
                "alias": alias,
                "at": time.time(),
                "reason": "a newer canary of the same alias was running too (two gateways started one at once)",
            },
        )
    op.create_index(
        "uq_canaries_active_alias",
        "canaries",
        ["alias"],
        unique=True,
        sqlite_where=ONE_ACTIVE,
        postgresql_where=ONE_ACTIVE,
    )


def downgrade() -> None:
    op.drop_index("uq_canaries_active_alias", table_name="canaries")
