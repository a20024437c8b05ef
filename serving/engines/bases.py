"""The base models a fleet serves, and which one an adapter needs.

Each engine serves one base model (``base:`` in the engines file, else the
gateway's ``LORAFLEET_BASE_MODEL``). A base is known by the sha256 of its
weights (``contract.basemodel``), the same identity every adapter manifest
records, so an adapter is routed only to engines whose base it was trained on.

An engine may instead serve a merged model (``lorafleet export --merge``) bound
to one adapter version (``merged: orders@3``): the merged model's record names
the adapter weights it was made from, which must be that version's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract.basemodel import BaseModelRecord, identify, sha256_file
from contract.fit import base_config
from contract.manifest import WEIGHTS_FILE, AdapterManifest
from contract.store import AdapterVersion


@dataclass(frozen=True)
class ServedBase:
    """A base model an engine serves: where it is, its identity, and its ``config.json`` (for shape checks)."""

    path: str
    record: BaseModelRecord
    config: dict[str, Any] | None = None

    @classmethod
    def of(cls, path: str) -> ServedBase:
        """Identify the model at ``path`` (a local directory: its record or its weights' checksum; a hub id)."""
        return cls(path, identify(path), base_config(path))

    @property
    def key(self) -> str:
        """What routing compares: the weights' sha256 (the name for a hub id, which cannot be hashed here)."""
        return self.record.sha256 or self.record.name

    @property
    def dir_name(self) -> str:
        """The last part of its path: what an engine's ``/v1/models`` root is compared with."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def fits(self, manifest: AdapterManifest) -> bool:
        return manifest.base_mismatch(self.record.name, self.record.sha256) is None


def base_for(manifest: AdapterManifest, bases: list[ServedBase]) -> ServedBase | None:
    """The base among ``bases`` the adapter was trained on: the same weights checksum, else (a hub id on either
    side, which cannot be compared) the same name; ``None`` when none is."""
    wanted = manifest.base_model
    for base in bases:
        if wanted.sha256 and base.record.sha256 == wanted.sha256:
            return base
    for base in bases:
        if not (wanted.sha256 and base.record.sha256) and base.record.name == wanted.name:
            return base
    return None


def merged_problem(base: ServedBase, version: AdapterVersion) -> str | None:
    """Why the merged model ``base`` is not ``version`` merged into its base model; ``None`` when it is."""
    merged = base.record.merged_from
    if merged is None:
        return (
            f"its model {base.path!r} records no merge (make it with `lorafleet export "
            f"{version.path} --out <dir> --merge`)"
        )
    try:
        weights = sha256_file(version.path / WEIGHTS_FILE)
    except OSError as exc:
        return f"{version.ref} cannot be read from the store: {exc}"
    if merged.adapter_sha256 != weights:
        return (
            f"its model {base.path!r} was merged from other adapter weights ({merged.adapter}, "
            f"{merged.adapter_sha256[:12]}) than {version.ref} ({weights[:12]})"
        )
    return None
