"""The adapter store: versioned adapter directories, published atomically.

Layout::

    <root>/<alias>/<version>/   a complete adapter directory (see ``contract.manifest``)
    <root>/<alias>/<version>/gate.json   the latest evaluation gate verdict for that version
    <root>/<alias>/training.json  a training run that will publish the next version: step, total, ETA
    <root>/.staging/            copies in progress; never read by anyone

and, kept by the store's *ledger* (``Ledger``): which version of each alias is
stable, which versions are retired, and the audit trail of every promotion,
rollback and retirement. On one machine the ledger is files beside the versions
(``FileLedger``: ``<alias>/stable.json``, ``<alias>/events.jsonl``,
``<alias>/<version>/retired.json``); with several gateways on PostgreSQL it is
tables of the state database (``serving.state.ledger.SqlLedger``), so a change is a
transaction every gateway hears of.

A version is an integer that only grows. An alias with no stable version
serves its newest one (the first publish needs no ceremony); once a version
has been made stable, a newer one is served only after it passes the
evaluation gate and is promoted (``promote``; ``force=True`` skips the gate
and says so in the audit trail). Publishing copies the adapter into
``.staging`` and renames it into place in one step, so a reader sees either the
whole version or none of it, and a crash mid-copy leaves nothing half-written
in the store (only a staging folder, removed by the next publish).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from contract.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, AdapterManifest, read_manifest

ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
STAGING = ".staging"
# Staging folders are named <host>.<pid>.<random>: the store may be a volume several hosts (pods) write, each with
# its own process ids, so only this host's own dead processes' folders are ever cleaned up.
STAGING_NAME = re.compile(r"^(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>[0-9]+)\.")
OPTIONAL_FILES = ("metrics.jsonl", "loss.png")  # the training record travels with the weights
GATE_FILE = "gate.json"
STABLE_FILE = "stable.json"
EVENTS_FILE = "events.jsonl"
RETIRED_FILE = "retired.json"
LOCK_FILE = ".lock"  # held while the stable pointer or a retirement changes (FileLedger.change)
TRAINING_FILE = "training.json"
# A training announcement not refreshed for this long is from a run that died without cleaning up.
TRAINING_STALE_S = 120.0


class StoreError(ValueError):
    """A store operation was refused; the message says why and what to do."""


class VersionNotFound(StoreError):
    """No such alias or version."""


class StoreConflict(StoreError):
    """Another writer changed the alias first (or is changing it now): look again, then retry."""


class LedgerChange(Protocol):
    """One change of an alias's ledger, made while ``Ledger.change`` holds the alias: all of it or none."""

    def stable(self) -> int | None:
        """The stable version as it is now (read under the change's lock)."""

    def set_stable(self, version: int, event: dict[str, Any]) -> None:
        """Make ``version`` stable (and not retired), recording ``event`` in the audit trail."""

    def retire(self, version: int, event: dict[str, Any]) -> None:
        """Take ``version`` out of service, recording ``event`` in the audit trail."""


class Ledger(Protocol):
    """Where an alias's stable pointer, retired versions and audit trail are kept."""

    def stable(self, alias: str) -> int | None: ...

    def retired(self, alias: str) -> frozenset[int]: ...

    def events(self, alias: str) -> list[dict[str, Any]]: ...

    def change(self, alias: str) -> AbstractContextManager[LedgerChange]:
        """Hold ``alias`` for one change; a writer that finds it held (another gateway, another host) gets
        ``StoreConflict`` at once rather than waiting."""
        ...


class FileLedger:
    """The ledger as files beside the versions: ``stable.json``, ``events.jsonl`` and each version's
    ``retired.json``; a change holds the alias folder's ``flock`` (which holds across NFSv4 clients)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def stable(self, alias: str) -> int | None:
        pointer = self.root / alias / STABLE_FILE
        return int(json.loads(pointer.read_text("utf-8"))["version"]) if pointer.is_file() else None

    def retired(self, alias: str) -> frozenset[int]:
        alias_dir = self.root / alias
        if not alias_dir.is_dir():
            return frozenset()
        return frozenset(int(p.parent.name) for p in alias_dir.glob(f"*/{RETIRED_FILE}") if p.parent.name.isdigit())

    def events(self, alias: str) -> list[dict[str, Any]]:
        path = self.root / alias / EVENTS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]

    @contextlib.contextmanager
    def change(self, alias: str) -> Iterator[LedgerChange]:
        alias_dir = self.root / alias
        with open(alias_dir / LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise StoreConflict(
                    f"another promotion or retirement of {alias!r} is in progress; look at "
                    "`lorafleet adapters history` and retry"
                ) from exc
            try:
                yield _FileChange(self, alias_dir)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class _FileChange:
    def __init__(self, ledger: FileLedger, alias_dir: Path) -> None:
        self.ledger, self.alias_dir = ledger, alias_dir

    def stable(self) -> int | None:
        return self.ledger.stable(self.alias_dir.name)

    def set_stable(self, version: int, event: dict[str, Any]) -> None:
        _write_atomic(self.alias_dir / STABLE_FILE, json.dumps({"version": version, "event": event}) + "\n")
        (self.alias_dir / str(version) / RETIRED_FILE).unlink(missing_ok=True)  # promoting brings it back
        self._log(event)

    def retire(self, version: int, event: dict[str, Any]) -> None:
        _write_atomic(self.alias_dir / str(version) / RETIRED_FILE, json.dumps(event) + "\n")
        self._log(event)

    def _log(self, event: dict[str, Any]) -> None:
        with open(self.alias_dir / EVENTS_FILE, "a", encoding="utf-8") as log:
            log.write(json.dumps(event) + "\n")


@dataclass(frozen=True)
class AdapterVersion:
    alias: str
    version: int
    path: Path

    @property
    def ref(self) -> str:
        """The engine-side name of this version, e.g. ``orders@3``."""
        return f"{self.alias}@{self.version}"

    def manifest(self) -> AdapterManifest:
        return read_manifest(self.path)


def check_alias(alias: str) -> str:
    if not ALIAS_RE.match(alias):
        raise StoreError(
            f"invalid alias {alias!r}: use 1-63 lowercase letters, digits, '-' or '_', starting with a letter or digit"
        )
    return alias


class AdapterStore:
    def __init__(self, root: Path, ledger: Ledger | None = None) -> None:
        self.root = Path(root)
        self.ledger: Ledger = ledger if ledger is not None else FileLedger(self.root)

    def aliases(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and ALIAS_RE.match(p.name))

    def versions(self, alias: str) -> list[AdapterVersion]:
        """The alias's versions, oldest first: only whole ones (a number claimed by a publish whose files are not
        in yet, or whose publisher died, is no version)."""
        return [v for v in self._claimed(alias) if (v.path / MANIFEST_FILE).is_file()]

    def _claimed(self, alias: str) -> list[AdapterVersion]:
        """Every version number taken in the alias's folder, whole or not."""
        alias_dir = self.root / check_alias(alias)
        if not alias_dir.is_dir():
            return []
        found = [AdapterVersion(alias, int(p.name), p) for p in alias_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        return sorted(found, key=lambda v: v.version)

    def latest(self, alias: str) -> AdapterVersion | None:
        versions = self.versions(alias)
        return versions[-1] if versions else None

    def get(self, alias: str, version: int) -> AdapterVersion:
        path = self.root / check_alias(alias) / str(version)
        if not (path / MANIFEST_FILE).is_file():
            raise VersionNotFound(f"no version {version} of adapter {alias!r} in {self.root}")
        return AdapterVersion(alias, version, path)

    def stable(self, alias: str) -> AdapterVersion | None:
        """The version made stable by the last promotion or rollback, if any."""
        version = self.ledger.stable(check_alias(alias))
        return None if version is None else self.get(alias, version)

    def serving(self, alias: str) -> AdapterVersion | None:
        """The version requests for ``alias`` go to: the stable one, else the newest not retired."""
        stable = self.stable(alias)
        if stable is not None:
            return stable
        retired = self.ledger.retired(alias)
        live = [v for v in self.versions(alias) if v.version not in retired]
        return live[-1] if live else None

    def is_retired(self, version: AdapterVersion) -> bool:
        return version.version in self.ledger.retired(version.alias)

    def retire(self, alias: str, version: int, *, reason: str = "", actor: str = "cli") -> dict[str, Any]:
        """Take a version out of service (its files stay, for the record). The stable version cannot be retired."""
        target = self.get(alias, version)
        with self.ledger.change(alias) as change:
            if change.stable() == version:
                raise StoreError(f"{target.ref} is the stable version; promote or roll back to another version first")
            event = {
                "at": time.time(),
                "alias": alias,
                "action": "retire",
                "from": None,
                "to": version,
                "forced": False,
                "gate_passed": None,
                "reason": reason,
                "actor": actor,
            }
            change.retire(version, event)
        return event

    def gate(self, version: AdapterVersion) -> dict[str, Any] | None:
        """The last evaluation gate verdict recorded for ``version`` (``{"passed": bool, ...}``)."""
        path = version.path / GATE_FILE
        return json.loads(path.read_text("utf-8")) if path.is_file() else None

    def record_gate(self, version: AdapterVersion, verdict: dict[str, Any]) -> None:
        _write_atomic(version.path / GATE_FILE, json.dumps(verdict, indent=2) + "\n")

    def gate_refusal(self, target: AdapterVersion) -> str | None:
        """Why ``target`` may not become stable without forcing, or ``None``: it needs a passing gate,
        unless it was stable before (a rollback to a version that has proven itself)."""
        gate = self.gate(target)
        was_stable = any(e.get("to") == target.version and e["action"] != "retire" for e in self.events(target.alias))
        if was_stable or (gate and gate.get("passed")):
            return None
        why = "has no evaluation gate verdict" if gate is None else "failed its evaluation gate"
        return (
            f"{target.ref} {why}; run `lorafleet eval --gate --target {target.ref} ...` first, "
            "or force it (recorded in the audit trail)"
        )

    def promote(
        self,
        alias: str,
        version: int,
        *,
        force: bool = False,
        reason: str = "",
        actor: str = "cli",
        expected: int | Literal["any"] | None = "any",
    ) -> dict:
        """Make ``alias@version`` stable. It must have passed its evaluation gate unless ``force``.

        Rolling back to an earlier version is a promotion too; a version that
        was stable before has proven itself and needs no new gate. Returns the
        audit event, which is also appended to the alias's ``events.jsonl``.

        ``expected``: the stable version the caller saw (``None``: none); if another writer moved the pointer
        since, ``StoreConflict`` and nothing changes. Two gateways promoting at once: one wins, the other is told.
        """
        target = self.get(alias, version)
        with self.ledger.change(alias) as change:
            previous = change.stable()
            if expected != "any" and previous != expected:
                now = f"v{previous}" if previous else "no stable version"
                raise StoreConflict(
                    f"{alias} changed meanwhile: it is at {now}, not "
                    f"{'v' + str(expected) if expected else 'no stable version'}; look at "
                    "`lorafleet adapters history` and retry"
                )
            gate = self.gate(target)
            refusal = None if force else self.gate_refusal(target)
            if refusal:
                raise StoreError(refusal)
            event = {
                "at": time.time(),
                "alias": alias,
                "action": "rollback" if previous and version < previous else "promote",
                "from": previous,
                "to": version,
                "forced": bool(force),
                "gate_passed": gate.get("passed") if gate else None,
                "reason": reason,
                "actor": actor,
            }
            change.set_stable(version, event)
        return event

    def events(self, alias: str) -> list[dict[str, Any]]:
        """The audit trail of ``alias``, oldest first."""
        return self.ledger.events(check_alias(alias))

    def publish(self, source: Path, alias: str) -> AdapterVersion:
        """Copy the adapter directory ``source`` into the store as the next version of ``alias``."""
        check_alias(alias)
        read_manifest(source)  # refuse an incomplete or invalid adapter before copying anything
        staging_root = self.root / STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        self._clean_staging(staging_root)
        staging = staging_root / staging_name()
        staging.mkdir()
        try:
            names = [WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE]
            names += [n for n in OPTIONAL_FILES if (Path(source) / n).is_file()]
            links = [n for n in names if (Path(source) / n).is_symlink()]
            if links:  # a link could make the store copy any file the publisher can read
                raise StoreError(f"{source}: {', '.join(links)} are symbolic links; publish the files themselves")
            for name in names:
                shutil.copy2(Path(source) / name, staging / name, follow_symlinks=False)
                _fsync(staging / name)
            alias_dir = self.root / alias
            alias_dir.mkdir(exist_ok=True)
            while True:
                claimed = self._claimed(alias)  # numbers taken, whole or not: never one claimed by another publish
                version = (claimed[-1].version if claimed else 0) + 1
                target = alias_dir / str(version)
                try:
                    # mkdir claims the number (a concurrent publisher gets FileExistsError); readers see no version
                    # there until the files are renamed in with the folder, whole (``versions``).
                    target.mkdir()
                except FileExistsError:
                    continue
                try:
                    os.replace(staging, target)
                except BaseException:
                    target.rmdir()  # an empty claimed number must not become the alias's newest version
                    raise
                break
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        (alias_dir / TRAINING_FILE).unlink(missing_ok=True)  # the run it announced has published
        return AdapterVersion(alias, version, target)

    def announce_training(self, alias: str, status: dict[str, Any]) -> None:
        """Say that a run is training the next version of ``alias`` (``status``: step, max_steps, eta_s, ...).

        The gateway answers a request for an alias that has no version yet but
        an announcement with 503 and the ETA instead of 404. Publishing ends the
        announcement; so does ``end_training``, and a run that dies stops
        refreshing it (stale after ``TRAINING_STALE_S``).
        """
        alias_dir = self.root / check_alias(alias)
        alias_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(alias_dir / TRAINING_FILE, json.dumps(status | {"updated_at": time.time()}) + "\n")

    def training(self, alias: str) -> dict[str, Any] | None:
        """The live training announcement of ``alias``, or ``None`` (none, or a stale one)."""
        path = self.root / check_alias(alias) / TRAINING_FILE
        try:
            status: dict[str, Any] = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        if time.time() - float(status.get("updated_at", 0)) > TRAINING_STALE_S:
            return None
        return status

    def end_training(self, alias: str) -> None:
        (self.root / check_alias(alias) / TRAINING_FILE).unlink(missing_ok=True)

    @staticmethod
    def _clean_staging(staging_root: Path) -> None:
        # A staging folder of this host whose process is gone is debris from a crash; another host's is never
        # touched (its process ids mean nothing here).
        for leftover in staging_root.iterdir():
            named = STAGING_NAME.match(leftover.name)
            if named and named["host"] == host_id() and not _alive(int(named["pid"])):
                shutil.rmtree(leftover, ignore_errors=True)


def host_id() -> str:
    """This host's name as staging folders carry it (a Kubernetes pod's name)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def staging_name(kind: str = "publish") -> str:
    """A fresh staging folder name for this host and process (see ``STAGING_NAME``)."""
    return f"{host_id()}.{os.getpid()}.{kind}-{uuid.uuid4().hex}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, "utf-8")
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
