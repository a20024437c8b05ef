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


def test_a_version_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    """A number claimed by a publish whose files are not in yet (or whose publisher died between the claim and
    the rename) is no version: not the newest, not gettable, not served; the next publish takes the number after."""
    store = AdapterStore(tmp_path / "store")
    store.publish(make_adapter(tmp_path / "a1"), "orders")
    (store.root / "orders" / "2").mkdir()  # claimed, still empty
    assert store.latest("orders").version == 1 and [v.version for v in store.versions("orders")] == [1]
    assert store.serving("orders").version == 1
    with pytest.raises(StoreError):
        store.get("orders", 2)
    assert store.publish(make_adapter(tmp_path / "a3"), "orders").version == 3
    assert [v.version for v in store.versions("orders")] == [1, 3]


def test_promotions_at_once_have_one_winner_and_the_others_are_told(tmp_path: Path) -> None:
    """Eight writers (gateway replicas) promote different versions at the same moment, each having seen no
    stable version: one wins; every other gets StoreConflict, and the audit trail has one promotion."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from contract.store import StoreConflict

    store = AdapterStore(tmp_path / "store")
    for i in range(8):
        store.publish(make_adapter(tmp_path / f"v{i}"), "orders")
    start = threading.Barrier(8)

    def promote(version: int) -> str:
        start.wait()
        try:
            store.promote("orders", version, force=True, expected=None)
        except StoreConflict as exc:
            assert "orders" in str(exc) and "retry" in str(exc)
            return "conflict"
        return "won"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(promote, range(1, 9)))
    assert sorted(outcomes) == ["conflict"] * 7 + ["won"]
    winner = outcomes.index("won") + 1
    assert store.stable("orders").version == winner  # type: ignore[union-attr]
    assert [e["to"] for e in store.events("orders")] == [winner]


def test_a_promotion_from_a_stale_view_changes_nothing(tmp_path: Path) -> None:
    from contract.store import StoreConflict

    store = AdapterStore(tmp_path / "store")
    for i in range(3):
        store.publish(make_adapter(tmp_path / f"v{i}"), "orders")
    store.promote("orders", 2, force=True, expected=None)
    with pytest.raises(StoreConflict, match="it is at v2, not v1"):
        store.promote("orders", 3, force=True, expected=1)
    assert store.stable("orders").version == 2  # type: ignore[union-attr]
    assert len(store.events("orders")) == 1
    store.promote("orders", 3, force=True, expected=2)  # with what is really there, it goes through
    assert "1" in [p.name for p in (tmp_path / "store" / "orders").iterdir()]
    assert [v.version for v in store.versions("orders")] == [1, 2, 3]  # the lock file is not a version
