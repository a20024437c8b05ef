"""Identify a base model by the sha256 of its weights, so adapters name exactly what they fit."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from pydantic import BaseModel, Field

RECORD_FILE = "lorafleet-model.json"


class MergedFrom(BaseModel):
    """What a merged model (``lorafleet export --merge``) was made from."""

    adapter: str = Field(description="The adapter directory merged (a store path names its alias and version).")
    adapter_sha256: str = Field(description="sha256 of its adapter_model.safetensors.")
    base_name: str
    base_sha256: str


class BaseModelRecord(BaseModel):
    name: str
    sha256: str
    source: str
    merged_from: MergedFrom | None = None


def sha256_of_model_dir(model_dir: Path) -> str:
    """sha256 over every weight file (``*.safetensors``, sorted by name) of a model directory."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors weights")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_record(model_dir: Path) -> BaseModelRecord | None:
    path = Path(model_dir) / RECORD_FILE
    if not path.is_file():
        return None
    return BaseModelRecord.model_validate_json(path.read_text())


def write_record(model_dir: Path, record: BaseModelRecord) -> None:
    (Path(model_dir) / RECORD_FILE).write_text(json.dumps(record.model_dump(), indent=2) + "\n")


def install(staging: Path, record: BaseModelRecord, target: Path) -> None:
    """Record ``record`` in the finished model directory ``staging`` and move it to ``target`` in one rename,
    replacing what is there (an earlier attempt, or the previous export). Its files get the usual permissions
    (the process's umask), not the private ones a temporary directory's files were written with."""
    write_record(staging, record)
    mask = os.umask(0)
    os.umask(mask)
    for path in staging.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~mask)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def provisioned(models_dir: Path | None, name: str, sha256: str | None = None) -> Path | None:
    """The model ``name`` provisioned under ``models_dir`` (with that sha256, if given), or ``None``."""
    if models_dir is None or "/" in name or name in ("", ".", ".."):
        return None
    record = read_record(models_dir / name)
    if record is None or (sha256 and record.sha256 != sha256):
        return None
    return models_dir / name


def identify(model: str) -> BaseModelRecord:
    """The record of a local model directory: the stored one, or computed from its weights."""
    model_dir = Path(model)
    if not model_dir.is_dir():
        # A hub id: its weights are not here to hash; the id is the identity.
        return BaseModelRecord(name=model, sha256="", source=f"hub:{model}")
    return read_record(model_dir) or BaseModelRecord(
        name=model_dir.name, sha256=sha256_of_model_dir(model_dir), source=f"dir:{model_dir}"
    )
