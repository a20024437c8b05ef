"""The evaluation gate, its statistics, the promotion rule it guards, and the reports: no engine needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from contract.store import AdapterStore
from evaluation.run import EvalSet
from evaluation.scores import Generation, TargetScores, score
from tests.conftest import make_adapter, orders_schema

GOOD = {"customer": {"name": "Ann Lee", "email": "ann@x.io"}, "order_id": "7", "status": "shipped"}
WRONG_STATUS = GOOD | {"status": "pending"}


def scored(target: str, outputs: list[str], mode: str = "unconstrained") -> TargetScores:
    scores = TargetScores(target, mode, wall_s=1.0)
    for text in outputs:
        gen = Generation(text, "stop", 0.1, 20)
        scores.items.append(score(gen, expected=json.dumps(GOOD), schema=orders_schema()))
    return scores


def outputs(right: int, wrong: int = 0, broken: int = 0) -> list[str]:
    return [json.dumps(GOOD)] * right + [json.dumps(WRONG_STATUS)] * wrong + ["Sure! ```json"] * broken


# -- statistics -------------------------------------------------------------------------------


# -- the gate ----------------------------------------------------------------------------------


# -- promotion needs a passing gate -------------------------------------------------------------


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


# -- reports -----------------------------------------------------------------------------------
