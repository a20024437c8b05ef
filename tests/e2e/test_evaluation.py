"""`lorafleet eval` with real vLLM on a small held-out set: checks first, then scores base and adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contract.store import AdapterStore
from evaluation.run import EvalError, resolve_targets
from tests.conftest import ORDERS, ROOT, make_adapter


def test_bad_targets_are_all_named_before_generation(base_model: Path, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters")
    store.publish(make_adapter(tmp_path / "other", base_sha256="f" * 64), "other")
    with pytest.raises(EvalError) as exc:
        resolve_targets(["base", "nope@3", "other@1"], store, str(base_model))
    text = str(exc.value)
    assert "target nope@3: no version 3 of adapter 'nope'" in text
    assert "target other@1: trained on m (ffffffffffff), not the base" in text


def test_targets_on_other_base_models_run_on_their_own(base_model: Path, tmp_path: Path) -> None:
    """`base:MODEL` names a provisioned base; an adapter trained on another base runs on it when it is provisioned
    (same name and sha256), and is refused with the pull to run when it is not."""
    from contract.basemodel import BaseModelRecord, write_record

    models = tmp_path / "models"
    other = models / "m"
    other.mkdir(parents=True)
    write_record(other, BaseModelRecord(name="m", sha256="f" * 64, source="test"))
    store = AdapterStore(tmp_path / "adapters")
    store.publish(make_adapter(tmp_path / "a", base_sha256="f" * 64), "other")
    store.publish(make_adapter(tmp_path / "b", base_sha256="e" * 64), "stray")
    targets = resolve_targets(["base", "base:m", "other"], store, str(base_model), models)
    assert [(t.name, t.base) for t in targets] == [("base", None), ("base:m", str(other)), ("other@1", str(other))]
    with pytest.raises(EvalError) as exc:
        resolve_targets(["base:nothing", "stray", "base:../x"], store, str(base_model), models)
    text = str(exc.value)
    assert "target base:nothing: no base model 'nothing'" in text and "`lorafleet model pull nothing`" in text
    assert "target stray: trained on m (eeeeeeeeeeee)" in text and "m is not provisioned" in text
    assert "target base:../x: no base model" in text


def test_one_run_scores_targets_on_two_base_models(gemma_model: Path, base_model: Path, tmp_path: Path) -> None:
    """SmolLM2 and Gemma 3 270M with an adapter of its own, in one `lorafleet eval`: one engine per base, one
    after the other, one report."""
    from tests.conftest import trained_on

    data_dir = tmp_path / "var"
    (data_dir / "models").mkdir(parents=True)
    for model in (base_model, gemma_model):
        (data_dir / "models" / model.name).symlink_to(model)
    rows = (ORDERS / "train.jsonl").read_text().splitlines(keepends=True)[:24]
    (tmp_path / "train.jsonl").write_text("".join(rows))
    AdapterStore(data_dir / "adapters").publish(
        trained_on(gemma_model, tmp_path / "train.jsonl", tmp_path / "g"), "orders-gemma"
    )
    data = tmp_path / "test.jsonl"
    data.write_text("".join((ORDERS / "test.jsonl").read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafleet",
            "eval",
            "--data",
            str(data),
            "--schema",
            str(ORDERS / "schema.json"),
            "--target",
            "base",
            "--target",
            "base:gemma-3-270m",
            "--target",
            "orders-gemma",
            "--mode",
            "constrained",
            "--out",
            str(out),
            "--max-tokens",
            "48",
        ],
        cwd=ROOT,
        env=os.environ | {"LORAFLEET_DATA_DIR": str(data_dir), "VLLM_CPU_KVCACHE_SPACE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [(r["target"], r["mode"], r["n"]) for r in report["results"]] == [
        ("base", "constrained", 4),
        ("base:gemma-3-270m", "constrained", 4),
        ("orders-gemma@1", "constrained", 4),
    ]
    for row in report["results"]:  # constrained: every answer that finished is valid JSON of the schema
        assert row["schema_valid_rate"]["successes"] + row["truncated_rate"]["successes"] == 4, row


def test_eval_scores_base_and_adapter_in_both_modes(tiny_adapter: Path, base_model: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    AdapterStore(data_dir / "adapters").publish(tiny_adapter, "orders")
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / base_model.name).symlink_to(base_model)
    data = tmp_path / "test.jsonl"
    data.write_text("".join((ORDERS / "test.jsonl").read_text().splitlines(keepends=True)[:6]))
    robust = tmp_path / "robust.jsonl"
    robust.write_text("".join((ORDERS / "robust.jsonl").read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafleet",
            "eval",
            "--data",
            str(data),
            "--robust",
            str(robust),
            "--schema",
            str(ORDERS / "schema.json"),
            "--target",
            "base",
            "--target",
            "orders@1",
            "--out",
            str(out),
            "--max-tokens",
            "96",
            "--gate",
            "--min-valid",
            "0",
            "--min-field-accuracy",
            "0",
        ],
        cwd=ROOT,
        env=os.environ | {"LORAFLEET_DATA_DIR": str(data_dir), "VLLM_CPU_KVCACHE_SPACE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = {(r["target"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(t, m) for t in ("base", "orders@1") for m in ("unconstrained", "constrained")}
    for row in rows.values():
        assert row["n"] == 6 and 0 <= row["schema_valid_rate"]["low"] <= row["schema_valid_rate"]["high"] <= 1
    # Constrained decoding makes every answer parse and match the schema (unless cut off).
    for target in ("base", "orders@1"):
        constrained = rows[(target, "constrained")]
        assert constrained["schema_valid_rate"]["successes"] + constrained["truncated_rate"]["successes"] == 6
    assert "| orders@1 | constrained | 6 |" in (out / "report.md").read_text()
    for name in ("report.png", "failures.jsonl", "review.html", "review.csv"):
        assert (out / name).stat().st_size > 0, name
    # The gate ran on the adapter (not the base model), was recorded, and lets the version be promoted.
    assert [g["target"] for g in report["gates"]] == ["orders@1"] and report["gates"][0]["passed"]
    store = AdapterStore(data_dir / "adapters")
    assert store.gate(store.get("orders", 1))["passed"] is True
    assert store.promote("orders", 1)["gate_passed"] is True
    # The robustness split: scored beside, reported in its own folder, and judged by the same gate.
    beside = json.loads((out / "robust" / "report.json").read_text())
    assert {(r["target"], r["mode"], r["split"], r["n"]) for r in beside["results"]} == {
        (t, m, "robust", 4) for t in ("base", "orders@1") for m in ("unconstrained", "constrained")
    }
    assert {c["split"] for c in report["gates"][0]["checks"]} == {"held-out", "robust"}
    assert "| schema_valid | constrained (robust) |" in (out / "report.md").read_text()
    assert f"# Evaluation on `{robust}`" in (out / "robust" / "report.md").read_text()
