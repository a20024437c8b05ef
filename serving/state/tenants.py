"""Tenants, their API keys, the adapter aliases they may use and their limits, in the state database.

SQLAlchemy Core keeps the code driver-neutral: SQLite by default, PostgreSQL by
changing ``LORAFLEET_DATABASE_URL``. Keys are shown once at creation and stored
only as their sha256 (keys carry 256 random bits, so a fast hash is enough),
and compared in constant time; a short public id (``lf-AbCd1234``, the key's
first characters) names a key for listing and revoking without revealing it.

The gateway keeps what ``authenticate`` found in memory for ``cache_s``
seconds: every request would otherwise pay two database reads. Changes made
through this store (the admin API) clear the cache at once; changes another
process makes (the ``lorafleet tenants`` CLI writing the same database) show
within ``cache_s``. Unknown keys are never cached, so a key issued anywhere
works at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from serving.state.cache import ReadCache
from serving.state.changes import TENANTS, announce
from serving.state.db import ensure_schema, state_engine
from serving.state.tables import grants_table, keys_table, tenants_table

KEY_PREFIX = "lf-"
KEY_SHAPE = re.compile(r"lf-[A-Za-z0-9_-]{43}")  # what issue_key makes: anything else is refused unread
KEY_ID_CHARS = 8  # characters after the prefix that name a key in listings
UNKNOWN_KEY_TTL_S = 5.0  # how long a key the database does not know is answered 401 from memory
UNKNOWN_KEYS_KEPT = 100_000  # at most this many (about 15 MB); the oldest go first
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
GRANT_RECHECK_S = 1.0  # a model a tenant asked for and was not granted is looked up again after this


@dataclass(frozen=True)
class Limits:
    """Per-tenant limits; ``None`` means unlimited."""

    requests_per_minute: int | None = None
    max_concurrent: int | None = None
    max_tokens: int | None = None
    tokens_per_minute: int | None = None  # prompt + completion tokens, charged when each request ends
    running_jobs: int | None = None  # fine-tuning jobs training at once
    queued_jobs: int | None = None  # fine-tuning jobs waiting (validating, queued or paused)


# A new tenant's limits unless others are given: a budget per request (every sequence's max_tokens together), so
# that nobody can hold the engine with n=16 × max_tokens=2048 by default; one fine-tuning job training at a time
# and 20 waiting, so that one tenant cannot take every worker. None of the rest: rates are per-business.
DEFAULT_LIMITS = Limits(max_tokens=4096, running_jobs=1, queued_jobs=20)


def _check_limits(limits: Limits) -> None:
    for field_name, value in vars(limits).items():
        if value is not None and value < 1:
            raise TenantError(f"{field_name} must be at least 1 (or unset for no limit), got {value}")


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    aliases: frozenset[str]
    disabled: bool = False
    default_alias: str | None = None
    limits: Limits = field(default_factory=Limits)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "disabled": self.disabled,
            "aliases": sorted(self.aliases),
            "default_alias": self.default_alias,
            "limits": {
                "requests_per_minute": self.limits.requests_per_minute,
                "max_concurrent": self.limits.max_concurrent,
                "max_tokens": self.limits.max_tokens,
                "tokens_per_minute": self.limits.tokens_per_minute,
                "running_jobs": self.limits.running_jobs,
                "queued_jobs": self.limits.queued_jobs,
            },
        }


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    created_at: datetime
    revoked_at: datetime | None


class TenantError(ValueError):
    """A tenant operation was refused; the message says why."""


class TenantNotFound(TenantError):
    pass


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise TenantError(
            f"invalid tenant name {name!r}: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


class TenantStore:
    def __init__(self, url: str, cache_s: float = 0.0, outage_s: float = 0.0) -> None:
        self.engine = state_engine(url)
        ensure_schema(self.engine)
        # key digest -> tenant; every write below clears it; served up to outage_s longer while the database is down
        self._known: ReadCache[Tenant] = ReadCache(cache_s, outage_s=outage_s)
        # Digests of keys the database does not know: a flood of made-up keys costs one read per key per TTL.
        self._unknown: ReadCache[bool] = ReadCache(UNKNOWN_KEY_TTL_S, maxsize=UNKNOWN_KEYS_KEPT)
        self._missing_grants: dict[tuple[int, str], float] = {}  # (tenant id, alias) -> when it was found missing

    def changed(self) -> None:
        """Forget what is cached: after a write here, or one another gateway announced (``serving.state.changes``)."""
        self._known.changed()
        self._unknown.changed()

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """One write transaction; every gateway's cache forgets what it knew once it commits (this one at once,
        the others when PostgreSQL delivers the announcement: within a second)."""
        with self.engine.begin() as db:
            yield db
            announce(db, TENANTS)
        self.changed()  # not when the write failed: the cache stays as good as it was (the database may be away)

    # -- tenants -------------------------------------------------------------------------------

    def enroll(
        self, name: str, aliases: list[str] | tuple[str, ...] = (), limits: Limits | None = None
    ) -> tuple[Tenant, str]:
        """A new tenant with its grants, its limits (``None``: ``DEFAULT_LIMITS``) and its first API key, in one
        transaction: every name is checked first, and a refusal leaves nothing (a retry is not "already exists")."""
        check_name(name)
        bad = [alias for alias in aliases if not NAME_RE.match(alias)]
        if bad:
            raise TenantError(f"invalid alias names {bad}: use 1-63 lowercase letters, digits, '-' or '_'")
        limits = DEFAULT_LIMITS if limits is None else limits
        _check_limits(limits)
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with self._write() as db:
            if db.execute(sa.select(tenants_table.c.id).where(tenants_table.c.name == name)).first():
                raise TenantError(f"tenant {name!r} already exists")
            inserted = db.execute(
                tenants_table.insert().values(name=name, disabled=False, created_at=now, **vars(limits))
            ).inserted_primary_key
            if not inserted:
                raise TenantError(f"tenant {name!r} was not created")
            tenant_id = inserted[0]
            for alias in dict.fromkeys(aliases):
                db.execute(grants_table.insert().values(tenant_id=tenant_id, alias=alias))
            db.execute(
                keys_table.insert().values(
                    tenant_id=tenant_id, key_hash=_hash(key), key_id=key_id_of(key), created_at=now
                )
            )
        return self.require(name), key

    def create(self, name: str) -> Tenant:
        check_name(name)
        with self._write() as db:
            if db.execute(sa.select(tenants_table.c.id).where(tenants_table.c.name == name)).first():
                raise TenantError(f"tenant {name!r} already exists")
            result = db.execute(tenants_table.insert().values(name=name, disabled=False, created_at=datetime.now(UTC)))
            tenant_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
            if tenant_id is None:
                raise TenantError(f"tenant {name!r} was not created")
        return self.require(name)

    def get(self, name: str) -> Tenant | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(tenants_table).where(tenants_table.c.name == name)).first()
            return self._load(db, row) if row else None

    def require(self, name: str) -> Tenant:
        tenant = self.get(name)
        if tenant is None:
            raise TenantNotFound(f"no tenant {name!r}; list them with `lorafleet tenants list`")
        return tenant

    def all(self) -> list[Tenant]:
        with self.engine.connect() as db:
            rows = db.execute(sa.select(tenants_table).order_by(tenants_table.c.name)).all()
            return [self._load(db, row) for row in rows]

    def set_disabled(self, name: str, disabled: bool) -> Tenant:
        return self._update(name, disabled=disabled)

    def set_default_alias(self, name: str, alias: str | None) -> Tenant:
        tenant = self.require(name)
        if alias is not None and alias not in tenant.aliases:
            raise TenantError(f"tenant {name!r} is not granted {alias!r}; grant it first")
        return self._update(name, default_alias=alias)

    def set_limits(self, name: str, limits: Limits) -> Tenant:
        _check_limits(limits)
        return self._update(name, **vars(limits))

    def _update(self, name: str, **values: Any) -> Tenant:
        with self._write() as db:
            result = db.execute(tenants_table.update().where(tenants_table.c.name == name).values(**values))
            if result.rowcount == 0:
                raise TenantNotFound(f"no tenant {name!r}; list them with `lorafleet tenants list`")
        return self.require(name)

    # -- grants --------------------------------------------------------------------------------

    def grant(self, tenant: Tenant, alias: str) -> None:
        with self._write() as db:
            grant_in(db, tenant.id, alias)

    async def granted_now(self, tenant: Tenant, alias: str) -> bool:
        """Whether ``alias`` is granted to ``tenant`` in the database now, though not in what was cached (a
        fine-tuning job just published it). A miss is remembered for a second per tenant and alias (a flood of
        made-up names costs a read per name per second); a hit drops the cache so the next requests see the
        grant too. A database that does not answer is a miss."""
        key = (tenant.id, alias)
        if time.monotonic() - self._missing_grants.get(key, -GRANT_RECHECK_S) < GRANT_RECHECK_S:
            return False

        def read() -> bool:
            query = sa.select(grants_table.c.alias).where(
                grants_table.c.tenant_id == tenant.id, grants_table.c.alias == alias
            )
            with self.engine.connect() as db:
                return db.execute(query).first() is not None

        try:
            granted = await asyncio.to_thread(read)
        except sa.exc.SQLAlchemyError:
            granted = False
        if granted:
            self.changed()
            return True
        if len(self._missing_grants) > UNKNOWN_KEYS_KEPT:
            self._missing_grants.clear()
        self._missing_grants[key] = time.monotonic()
        return False

    def holders(self, alias: str) -> list[str]:
        """The tenants ``alias`` is granted to."""
        with self.engine.connect() as db:
            return sorted(holders_in(db, alias).values())

    def holds_alone(self, tenant_id: int, alias: str) -> bool:
        """``alone_in``, in a connection of its own."""
        with self.engine.connect() as db:
            return alone_in(db, tenant_id, alias)

    def revoke_grant(self, tenant: Tenant, alias: str) -> None:
        with self._write() as db:
            db.execute(
                grants_table.delete().where(grants_table.c.tenant_id == tenant.id, grants_table.c.alias == alias)
            )
            if tenant.default_alias == alias:
                db.execute(tenants_table.update().where(tenants_table.c.id == tenant.id).values(default_alias=None))

    # -- keys ----------------------------------------------------------------------------------

    def issue_key(self, tenant: Tenant) -> str:
        """A new API key for ``tenant``; the plaintext is returned once and never stored."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._write() as db:
            db.execute(
                keys_table.insert().values(
                    tenant_id=tenant.id, key_hash=_hash(key), key_id=key_id_of(key), created_at=datetime.now(UTC)
                )
            )
        return key

    def keys(self, tenant: Tenant) -> list[KeyInfo]:
        with self.engine.connect() as db:
            rows = db.execute(
                sa.select(keys_table).where(keys_table.c.tenant_id == tenant.id).order_by(keys_table.c.id)
            ).all()
        return [KeyInfo(r.key_id or "?", r.created_at, r.revoked_at) for r in rows]

    def revoke_key(self, tenant: Tenant, key_id: str) -> int:
        """Revoke the tenant's live keys whose public id is ``key_id``; returns how many."""
        with self._write() as db:
            result = db.execute(
                keys_table.update()
                .where(
                    keys_table.c.tenant_id == tenant.id,
                    keys_table.c.key_id == key_id,
                    keys_table.c.revoked_at.is_(None),
                )
                .values(revoked_at=datetime.now(UTC))
            )
        if result.rowcount == 0:
            raise TenantError(f"tenant {tenant.name!r} has no live key {key_id!r}; list them with `tenants keys`")
        return int(result.rowcount)

    def rotate_key(self, tenant: Tenant) -> str:
        """Issue a new key and revoke every other live key of the tenant, in one transaction."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with self._write() as db:
            db.execute(
                keys_table.update()
                .where(keys_table.c.tenant_id == tenant.id, keys_table.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            db.execute(
                keys_table.insert().values(
                    tenant_id=tenant.id, key_hash=_hash(key), key_id=key_id_of(key), created_at=now
                )
            )
        return key

    async def aauthenticate(self, key: str) -> Tenant | None:
        """``authenticate`` for a request: known keys (and known bogus ones) from memory, a stale one read again
        behind the answer, an unknown one read in a worker thread; the event loop never waits on the database."""
        if not KEY_SHAPE.fullmatch(key):
            return None
        digest = _hash(key)
        if self._unknown.get(digest):
            return None
        known, stale = self._known.servable(digest)
        if known is not None:  # found by its digest, the dictionary's own exact comparison
            if stale:
                self._known.refresh(digest, lambda: self._read_key(digest))
            return known
        return await self._known.read(digest, lambda: self._read_key(digest))

    def authenticate(self, key: str) -> Tenant | None:
        """The enabled tenant owning the unrevoked ``key``, or ``None``."""
        if not key.startswith(KEY_PREFIX):
            return None
        digest = _hash(key)
        if (known := self._known.get(digest)) is not None:
            return known
        if self._unknown.get(digest):
            return None
        return self._read_key(digest)

    def _read_key(self, digest: str) -> Tenant | None:
        """The key's tenant from the database (kept in memory either way: known, or known to be bogus)."""
        generation, unknown_generation = self._known.generation, self._unknown.generation
        with self.engine.connect() as db:
            row = db.execute(
                sa.select(keys_table.c.key_hash, *tenants_table.columns)
                .join(tenants_table, tenants_table.c.id == keys_table.c.tenant_id)
                .where(
                    keys_table.c.key_hash == digest,
                    keys_table.c.revoked_at.is_(None),
                    tenants_table.c.disabled.is_(False),
                )
            ).first()
            # The index lookup finds the row; the final comparison is constant-time.
            if row is None or not hmac.compare_digest(row.key_hash, digest):
                self._unknown.put(digest, True, unknown_generation)
                self._known.drop(digest)  # revoked or disabled since it was kept
                return None
            tenant = self._load(db, row)
        self._known.put(digest, tenant, generation)
        return tenant

    @staticmethod
    def _load(db: sa.Connection, row: Any) -> Tenant:
        aliases = db.execute(sa.select(grants_table.c.alias).where(grants_table.c.tenant_id == row.id))
        return Tenant(
            row.id,
            row.name,
            frozenset(a for (a,) in aliases),
            disabled=bool(row.disabled),
            default_alias=row.default_alias,
            limits=Limits(
                row.requests_per_minute,
                row.max_concurrent,
                row.max_tokens,
                row.tokens_per_minute,
                row.running_jobs,
                row.queued_jobs,
            ),
        )


def alone_in(db: sa.Connection, tenant_id: int, alias: str) -> bool:
    """Whether ``alias`` is granted to the tenant ``tenant_id`` and to no other (the aliases a tenant's jobs may
    publish into, and whose canaries are its to see)."""
    return set(holders_in(db, alias)) == {tenant_id}


def holders_in(db: sa.Connection, alias: str) -> dict[int, str]:
    """The tenants ``alias`` is granted to, by id, as ``db`` sees them (inside a caller's transaction)."""
    query = (
        sa.select(tenants_table.c.id, tenants_table.c.name)
        .join(grants_table, grants_table.c.tenant_id == tenants_table.c.id)
        .where(grants_table.c.alias == alias)
    )
    return {tenant_id: name for tenant_id, name in db.execute(query)}


def grant_in(db: sa.Connection, tenant_id: int, alias: str) -> None:
    """Within a write transaction: let the tenant use ``alias`` (every gateway hears it when it commits)."""
    exists = db.execute(
        sa.select(grants_table).where(grants_table.c.tenant_id == tenant_id, grants_table.c.alias == alias)
    ).first()
    if not exists:
        db.execute(grants_table.insert().values(tenant_id=tenant_id, alias=alias))
    announce(db, TENANTS)


def key_id_of(key: str) -> str:
    return key[: len(KEY_PREFIX) + KEY_ID_CHARS]
