"""Unpack an uploaded adapter archive (tar, tar.gz or zip) without trusting it.

Refused, each with the member named: absolute paths, ``..`` components,
links, devices and other special files, two members whose names clash (the
same name twice, or a file where another member needs a folder), more than
``MAX_MEMBERS`` members (a tar's headers are read one at a time and the
reading stops there), and
more than ``max_bytes`` once unpacked (sizes are read from the archive's index
and enforced again while copying, so a lying index cannot fill the disk).
"""

from __future__ import annotations

import functools
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

MAX_MEMBERS = 64


class ArchiveError(ValueError):
    """The archive is refused; the message names the member and the reason."""


def unpack(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Unpack the ``archive`` file into ``dest``; returns the folder holding ``lorafleet.json`` (the top or its
    only subfolder). The archive is read from disk as it is unpacked, never whole into memory."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _unzip(archive, dest, max_bytes)
    else:
        _untar(archive, dest, max_bytes)
    if (dest / "lorafleet.json").is_file():
        return dest
    subdirs = [p for p in dest.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / "lorafleet.json").is_file():
        return subdirs[0]
    raise ArchiveError("no lorafleet.json at the top of the archive or in its only folder")


def _safe_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if not path.parts or path.parts == (".",):
        raise ArchiveError(f"member {name!r}: empty name")
    if path.is_absolute() or ":" in path.parts[0]:
        raise ArchiveError(f"member {name!r}: absolute path")
    if ".." in path.parts:
        raise ArchiveError(f"member {name!r}: '..' would escape the archive")
    if len(path.parts) > 2:
        raise ArchiveError(f"member {name!r}: nested deeper than one folder")
    return path


def _copy_limited(src: IO[bytes], target: Path, budget: int, name: str) -> int:
    written = 0
    with open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > budget:
                raise ArchiveError(f"member {name!r}: the archive unpacks to more than the limit")
            out.write(chunk)
    return written


@dataclass(frozen=True)
class _Member:
    """One archive entry, whatever the format."""

    name: str
    size: int  # as the archive's index claims; enforced again while copying
    is_dir: bool
    is_file: bool  # a regular file (not a link, device or other special file)
    open: Callable[[], IO[bytes] | None]


def _extract(members: list[_Member], dest: Path, max_bytes: int) -> None:
    if len(members) > MAX_MEMBERS:
        raise ArchiveError(f"{len(members)} members; at most {MAX_MEMBERS}")
    claimed = sum(m.size for m in members)
    if claimed > max_bytes:
        raise ArchiveError(f"unpacks to {claimed} bytes; the limit is {max_bytes}")
    budget = max_bytes
    files: set[PurePosixPath] = set()
    dirs: set[PurePosixPath] = set()  # named ones and every file's parents
    for m in members:
        path = _safe_name(m.name)
        parents = {p for p in path.parents if p.parts}
        if path in files or (m.is_file and path in dirs) or parents & files:
            raise ArchiveError(f"member {m.name!r}: its name clashes with another member's")
        (dirs if m.is_dir else files).add(path)
        dirs |= parents
        if not (m.is_dir or m.is_file):
            raise ArchiveError(f"member {m.name!r}: links and special files are refused")
        if m.is_dir:
            (dest / path).mkdir(parents=True, exist_ok=True)
            continue
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        src = m.open()
        if src is None:
            raise ArchiveError(f"member {m.name!r}: unreadable")
        with src:
            budget -= _copy_limited(src, dest / path, budget, m.name)


def _untar(path: Path, dest: Path, max_bytes: int) -> None:
    try:
        archive = tarfile.open(path, mode="r:*")  # noqa: SIM115 (closed by the with below)
    except tarfile.TarError as exc:
        raise ArchiveError(f"not a tar or zip archive ({exc})") from exc
    with archive:
        members: list[_Member] = []
        for m in archive:  # one header at a time: an archive of a million members stops at the first over the limit
            if len(members) == MAX_MEMBERS:
                raise ArchiveError(f"more than {MAX_MEMBERS} members; at most {MAX_MEMBERS}")
            members.append(_Member(m.name, m.size, m.isdir(), m.isfile(), functools.partial(archive.extractfile, m)))
        _extract(members, dest, max_bytes)


def _unzip(path: Path, dest: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(path) as archive:
        members = []
        for info in archive.infolist():
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no file type
            special = bool(kind) and kind not in (stat.S_IFREG, stat.S_IFDIR)
            is_dir = info.is_dir() and not special
            is_file = not info.is_dir() and not special
            members.append(
                _Member(info.filename, info.file_size, is_dir, is_file, functools.partial(archive.open, info))
            )
        _extract(members, dest, max_bytes)


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
