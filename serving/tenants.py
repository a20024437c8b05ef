"""Tenants, their API keys and the adapter aliases they may use, in the state database.

SQLAlchemy Core keeps the code driver-neutral: SQLite by default, PostgreSQL by
changing ``LORAFLEET_DATABASE_URL``. Keys are shown once at creation and stored
only as their sha256 (keys carry 256 random bits, so a fast hash is enough), and
compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

KEY_PREFIX = "lf-"

metadata = sa.MetaData()
tenants_table = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), unique=True, nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
keys_table = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("tenant_id", sa.ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    sa.Column("key_hash", sa.String(64), unique=True, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)
grants_table = sa.Table(
    "grants",
    metadata,
    sa.Column("tenant_id", sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("alias", sa.String(64), primary_key=True),
)


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    aliases: frozenset[str]


class TenantError(ValueError):
    """A tenant operation was refused; the message says why."""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantStore:
    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)
        metadata.create_all(self.engine)

    def create(self, name: str) -> Tenant:
        with self.engine.begin() as db:
            if db.execute(sa.select(tenants_table.c.id).where(tenants_table.c.name == name)).first():
                raise TenantError(f"tenant {name!r} already exists")
            result = db.execute(tenants_table.insert().values(name=name, disabled=False, created_at=datetime.now(UTC)))
            tenant_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
            if tenant_id is None:
                raise TenantError(f"tenant {name!r} was not created")
            return Tenant(int(tenant_id), name, frozenset())

    def get(self, name: str) -> Tenant | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(tenants_table).where(tenants_table.c.name == name)).first()
            return self._load(db, row.id, row.name) if row else None

    def issue_key(self, tenant: Tenant) -> str:
        """A new API key for ``tenant``; the plaintext is returned once and never stored."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.engine.begin() as db:
            db.execute(
                keys_table.insert().values(tenant_id=tenant.id, key_hash=_hash(key), created_at=datetime.now(UTC))
            )
        return key

    def grant(self, tenant: Tenant, alias: str) -> None:
        with self.engine.begin() as db:
            exists = db.execute(
                sa.select(grants_table).where(grants_table.c.tenant_id == tenant.id, grants_table.c.alias == alias)
            ).first()
            if not exists:
                db.execute(grants_table.insert().values(tenant_id=tenant.id, alias=alias))

    def authenticate(self, key: str) -> Tenant | None:
        """The enabled tenant owning the unrevoked ``key``, or ``None``."""
        if not key.startswith(KEY_PREFIX):
            return None
        digest = _hash(key)
        with self.engine.connect() as db:
            row = db.execute(
                sa.select(keys_table.c.key_hash, tenants_table.c.id, tenants_table.c.name)
                .join(tenants_table, tenants_table.c.id == keys_table.c.tenant_id)
                .where(
                    keys_table.c.key_hash == digest,
                    keys_table.c.revoked_at.is_(None),
                    tenants_table.c.disabled.is_(False),
                )
            ).first()
            # The index lookup finds the row; the final comparison is constant-time.
            if row is None or not hmac.compare_digest(row.key_hash, digest):
                return None
            return self._load(db, row.id, row.name)

    @staticmethod
    def _load(db: sa.Connection, tenant_id: int, name: str) -> Tenant:
        aliases = db.execute(sa.select(grants_table.c.alias).where(grants_table.c.tenant_id == tenant_id))
        return Tenant(tenant_id, name, frozenset(a for (a,) in aliases))
