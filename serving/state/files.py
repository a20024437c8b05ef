"""Files a tenant uploads (OpenAI's files API): their records in the state database, their bytes on disk.

A file is written whole or not at all: its bytes stream into a staging file
(hashed and counted as they come, never held in memory), the record is
inserted, and the staging file is renamed into place in the same step; a
failure anywhere, a cut upload or a limit passed removes the staging file and
leaves no record. The bytes live in ``<root>/<tenant id>/<file id>``, readable
only through the tenant that owns them: another tenant's file is
``FileNotFound``, exactly like one that does not exist.

Limits, both from the settings: ``max_bytes`` per file, and ``quota_bytes``
for all of a tenant's files together (checked against what the upload says it
will send before a byte is written, and again against what it did send).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import sqlalchemy as sa

from serving.state.db import ensure_schema
from serving.state.tables import files_table

PURPOSES = ("fine-tune",)  # what this service does with files (OpenAI's other purposes are not served here)
RESULTS = "fine-tune-results"  # a job's step metrics, written by the job (never uploaded)
CHUNK = 1 << 20
STAGING = ".staging"


class FileError(Exception):
    """A file refused: the message says which limit or rule, and the fix."""


class FileNotFound(FileError):
    """No such file for this tenant (another tenant's file is reported the same)."""


class QuotaExceeded(FileError):
    """The tenant's files would take more than its quota."""


class FileTooLarge(FileError):
    """One file over the per-file limit."""


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant_id: int
    filename: str
    purpose: str
    bytes: int
    sha256: str
    created_at: int

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's ``FileObject``, field for field."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


class FileStore:
    def __init__(self, engine: sa.Engine, root: Path, max_bytes: int, quota_bytes: int) -> None:
        self.engine, self.root, self.max_bytes, self.quota_bytes = engine, Path(root), max_bytes, quota_bytes
        ensure_schema(engine)
        self._turns: dict[int, threading.Lock] = {}
        self._turns_lock = threading.Lock()

    @contextmanager
    def _turn(self, tenant_id: int) -> Iterator[None]:
        """One of the tenant's uploads at a time in this process (its quota check and its insert)."""
        with self._turns_lock:
            turn = self._turns.setdefault(tenant_id, threading.Lock())
        with turn:
            yield

    def used(self, tenant_id: int) -> int:
        """Bytes the tenant's files take now."""
        with self.engine.connect() as db:
            return _used(db, tenant_id)

    def admit(self, tenant_id: int, declared: int | None) -> None:
        """Refuse an upload before a byte is written when what it declares is over a limit."""
        if declared is None:
            return
        if declared > self.max_bytes + MULTIPART_SLACK:
            raise FileTooLarge(_too_large(self.max_bytes))
        used = self.used(tenant_id)
        if used + declared - MULTIPART_SLACK > self.quota_bytes:
            raise QuotaExceeded(_over_quota(self.quota_bytes, used))

    def add(
        self, tenant_id: int, filename: str, purpose: str, source: BinaryIO, *, made_here: bool = False
    ) -> FileRecord:
        """Store ``source`` (read to its end, a chunk at a time) as the tenant's new file; all or nothing.
        ``made_here``: a file the service writes for the tenant (a job's results), not an upload: any purpose,
        counted in the tenant's quota but never refused by it."""
        if purpose not in PURPOSES and not made_here:
            raise FileError(f"purpose {purpose!r}: this service takes files for {', '.join(PURPOSES)}")
        printable = "".join(ch for ch in Path(filename or "upload").name if ch.isprintable())
        name = printable[:255] or "upload"
        staging = self.root / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        partial = staging / f"{secrets.token_hex(8)}.part"
        try:
            size, digest = self._copy(source, partial)
            # Ids sort by creation (the nanosecond clock first): files made within one second still list in the
            # order they were made.
            file_id = f"file-{time.time_ns():016x}{secrets.token_hex(4)}"
            record = FileRecord(file_id, tenant_id, name, purpose, size, digest, int(time.time()))
            final = self.root / str(tenant_id) / record.id
            final.parent.mkdir(parents=True, exist_ok=True)
            renamed = False
            try:
                # The record and the rename together, one upload of the tenant's at a time (the quota's sum and
                # the insert must not interleave with another's): a failed rename writes no record, a failed
                # commit leaves no bytes.
                with self._turn(tenant_id), self.engine.begin() as db:
                    if db.dialect.name == "postgresql":  # the other gateways' uploads of this tenant wait too
                        lock = sa.text("SELECT pg_advisory_xact_lock(:lock, :tenant)")
                        db.execute(lock, {"lock": FILES_LOCK, "tenant": tenant_id})
                    used = _used(db, tenant_id)
                    if used + size > self.quota_bytes and not made_here:
                        raise QuotaExceeded(_over_quota(self.quota_bytes, used))
                    db.execute(files_table.insert().values(**vars(record)))
                    os.replace(partial, final)
                    renamed = True
            except BaseException:
                if renamed:
                    final.unlink(missing_ok=True)
                raise
            return record
        finally:
            partial.unlink(missing_ok=True)

    def _copy(self, source: BinaryIO, target: Path) -> tuple[int, str]:
        digest, size = hashlib.sha256(), 0
        with target.open("wb") as out:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > self.max_bytes:
                    raise FileTooLarge(_too_large(self.max_bytes))
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        return size, digest.hexdigest()

    def get(self, tenant_id: int, file_id: str) -> FileRecord:
        with self.engine.connect() as db:
            row = db.execute(
                sa.select(files_table).where(files_table.c.id == file_id, files_table.c.tenant_id == tenant_id)
            ).first()
        if row is None:
            raise FileNotFound(f"No such file: {file_id!r}.")
        return FileRecord(**row._mapping)

    def path(self, record: FileRecord) -> Path:
        return self.root / str(record.tenant_id) / record.id

    def open(self, record: FileRecord) -> BinaryIO:
        """The file's bytes, opened (``FileNotFound`` when they are gone: a record never answers without them)."""
        try:
            return self.path(record).open("rb")
        except FileNotFoundError as exc:
            raise FileNotFound(f"No such file: {record.id!r}.") from exc

    def page(
        self,
        tenant_id: int,
        *,
        after: str | None = None,
        limit: int = 10_000,
        order: Literal["asc", "desc"] = "desc",
        purpose: str | None = None,
    ) -> tuple[list[FileRecord], bool]:
        """The tenant's files by creation time (``after``: a file id, the page starts past it), and whether more
        follow."""
        key = (files_table.c.created_at, files_table.c.id)
        query = sa.select(files_table).where(files_table.c.tenant_id == tenant_id)
        if purpose is not None:
            query = query.where(files_table.c.purpose == purpose)
        if after is not None:
            cursor = self.get(tenant_id, after)
            past = sa.tuple_(*key) < (cursor.created_at, cursor.id)
            if order == "asc":
                past = sa.tuple_(*key) > (cursor.created_at, cursor.id)
            query = query.where(past)
        query = query.order_by(*(k.desc() if order == "desc" else k.asc() for k in key)).limit(limit + 1)
        with self.engine.connect() as db:
            rows = db.execute(query).all()
        return [FileRecord(**row._mapping) for row in rows[:limit]], len(rows) > limit

    def delete(self, tenant_id: int, file_id: str) -> None:
        record = self.get(tenant_id, file_id)
        with self.engine.begin() as db:
            db.execute(files_table.delete().where(files_table.c.id == record.id))
        self.path(record).unlink(missing_ok=True)


# pg_advisory_xact_lock(FILES_LOCK, tenant id): one upload of a tenant's at a time, in every gateway.
FILES_LOCK = 0x6C6606


def chunks(source: BinaryIO) -> Iterator[bytes]:
    """``source`` a chunk at a time, closed at the end."""
    with source:
        while chunk := source.read(CHUNK):
            yield chunk


# What multipart framing adds around a file's bytes (boundaries, part headers, the purpose field): an upload may
# declare this much more than the file itself.
MULTIPART_SLACK = 64 << 10


def _used(db: sa.Connection, tenant_id: int) -> int:
    """Bytes the tenant's files take, as ``db`` sees them."""
    total = sa.select(sa.func.coalesce(sa.func.sum(files_table.c.bytes), 0)).where(files_table.c.tenant_id == tenant_id)
    return int(db.execute(total).scalar_one())


def _too_large(limit: int) -> str:
    return f"The file is over the limit of {limit} bytes per file; split the data or ask for a higher limit."


def _over_quota(quota: int, used: int) -> str:
    return (
        f"Your files would take more than your quota of {quota} bytes ({used} bytes used now); delete files you "
        "no longer need (DELETE /v1/files/{id})."
    )
