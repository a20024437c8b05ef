"""The adapter store: versions grow, publishing is all-or-nothing, bad adapters are refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from contract.manifest import MANIFEST_FILE, WEIGHTS_FILE, ManifestError
from contract.store import AdapterStore, StoreError, host_id
from tests.conftest import make_adapter


def test_publish_assigns_growing_versions(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    src = make_adapter(tmp_path / "a")
    assert [store.publish(src, "orders").version for _ in range(3)] == [1, 2, 3]
    assert store.aliases() == ["orders"]
    latest = store.latest("orders")
    assert latest is not None and latest.ref == "orders@3"
    assert latest.manifest().task == "orders"


def test_incomplete_adapter_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    src = make_adapter(tmp_path / "a")
    (src / WEIGHTS_FILE).unlink()
    (src / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ManifestError, match=r"pickled \.bin weights are refused"):
        store.publish(src, "orders")
    assert store.versions("orders") == []


def test_bad_manifest_field_is_named(tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    manifest = json.loads((src / MANIFEST_FILE).read_text())
    manifest["lora"]["rank"] = "eight"
    (src / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"field lora\.rank"):
        AdapterStore(tmp_path / "store").publish(src, "orders")


@pytest.mark.parametrize("alias", ["Orders", "../x", "", "a/b", "x" * 80])
def test_invalid_alias_is_refused(tmp_path: Path, alias: str) -> None:
    with pytest.raises(StoreError, match="invalid alias"):
        AdapterStore(tmp_path).publish(make_adapter(tmp_path / "a"), alias)


def test_debris_of_a_crashed_publish_is_invisible_and_cleaned(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    # A publisher that died mid-copy (a pid that cannot exist) left a staging folder.
    debris = tmp_path / "store" / ".staging" / f"{host_id()}.999999999.publish-dead"
    debris.mkdir(parents=True)
    (debris / WEIGHTS_FILE).write_bytes(b"half")
    # Another host (a pod sharing the store volume) is publishing: its process id means nothing here.
    elsewhere = tmp_path / "store" / ".staging" / "gateway-7f9c-x2b.999999999.publish-live"
    elsewhere.mkdir()
    assert store.aliases() == []
    store.publish(make_adapter(tmp_path / "a"), "orders")
    assert not debris.exists()
    assert os.listdir(tmp_path / "store" / ".staging") == [elsewhere.name]  # never touched


def test_copy_failure_leaves_no_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = AdapterStore(tmp_path / "store")
    src = make_adapter(tmp_path / "a")
    calls = {"n": 0}
    real_copy = shutil.copy2

    def failing_copy(a: object, b: object, **kw: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_copy(a, b, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "copy2", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        store.publish(src, "orders")
    assert store.versions("orders") == []
    assert os.listdir(tmp_path / "store" / ".staging") == []


def test_symlinked_files_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    src = make_adapter(tmp_path / "a")
    secret = tmp_path / "secret.bin"
    secret.write_bytes((src / WEIGHTS_FILE).read_bytes())
    (src / WEIGHTS_FILE).unlink()
    (src / WEIGHTS_FILE).symlink_to(secret)
    with pytest.raises(StoreError, match="symbolic links"):
        store.publish(src, "orders")
    assert store.versions("orders") == [] and os.listdir(tmp_path / "store" / ".staging") == []


def test_a_failed_rename_leaves_no_empty_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = AdapterStore(tmp_path / "store")
    store.publish(make_adapter(tmp_path / "a"), "orders")

    def failing_replace(a: object, b: object) -> None:
        raise OSError("no space left")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="no space left"):
        store.publish(make_adapter(tmp_path / "b"), "orders")
    monkeypatch.undo()
    assert [v.version for v in store.versions("orders")] == [1] and store.serving("orders").version == 1  # type: ignore[union-attr]
