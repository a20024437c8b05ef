"""The gate through the CLI on the real base model: a failure exits non-zero, names the check and is recorded
(the statistics, the promotion rule and the reports: tests/unit/test_gate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from contract.store import AdapterStore
from evaluation.run import EvalSet
from evaluation.scores import TargetScores
from tests.conftest import make_adapter
from tests.unit.test_gate import GOOD, outputs, scored


def test_cli_gate_exits_non_zero_naming_the_failure_and_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_model: Path
) -> None:
    from lorafleet.cli import app

    data_dir = tmp_path / "var"
    store = AdapterStore(data_dir / "adapters")
    version = store.publish(make_adapter(tmp_path / "a", base_sha256=_sha(base_model)), "orders")
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / base_model.name).symlink_to(base_model)
    data = tmp_path / "test.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"order {i}", "output": json.dumps(GOOD)}) + "\n" for i in range(20))
    )
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(data_dir))

    def fake_evaluate(es: EvalSet, targets: list, modes: list[str], *a: object, **k: object) -> list[TargetScores]:
        return [scored(t.name, outputs(15, broken=5), m) for t in targets for m in modes]

    monkeypatch.setattr("evaluation.run.evaluate", fake_evaluate)
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--data",
            str(data),
            "--target",
            "orders@1",
            "--out",
            str(tmp_path / "r"),
            "--gate",
            "--mode",
            "unconstrained",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "gate failed: orders@1 unconstrained schema_valid: 15/20 schema-valid" in result.output
    gate = store.gate(version)
    assert gate is not None and gate["passed"] is False and gate["data"] == str(data)
    assert (tmp_path / "r" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _sha(base_model: Path) -> str:
    from contract.basemodel import identify

    return identify(str(base_model)).sha256
