"""`lorafleet ship` before it reaches a gateway: every mistake is exit 2 with what to fix; and the phases its
watch reports. The three endings against a live gateway: tests/e2e/test_rollout_e2e.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from typer.testing import CliRunner

from lorafleet.cli import app
from lorafleet.commands.ship import phase_of

runner = CliRunner()


def test_ship_says_what_is_missing_before_it_sends_anything(tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "hi", "output": "{}"}\n')
    monkeypatch.delenv("LORAFLEET_GATEWAY_URL", raising=False)
    monkeypatch.delenv("LORAFLEET_API_KEY", raising=False)
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path))
    cases = [
        ([str(data), "--alias", "orders"], "no gateway"),
        ([str(data), "--alias", "orders", "--gateway", "http://127.0.0.1:9"], "no tenant key"),
        (
            [str(data), "--alias", "orders", "--gateway", "http://127.0.0.1:9", "--key-file", str(tmp_path / "none")],
            "none",
        ),
    ]
    for args, said in cases:
        result = runner.invoke(app, ["ship", *args])
        assert result.exit_code == 2 and said in result.output, result.output
    key = tmp_path / "key"
    key.write_text("lf-x\n")
    base = [str(data), "--alias", "orders", "--gateway", "http://127.0.0.1:9", "--key-file", str(key)]
    for options, said in (("{not json", "not JSON"), ("[1]", "JSON object")):
        result = runner.invoke(app, ["ship", *base, "--options", options])
        assert result.exit_code == 2 and said in result.output, result.output
    unreachable = runner.invoke(app, ["ship", *base])
    assert unreachable.exit_code == 2 and "cannot be reached" in unreachable.output
    missing = runner.invoke(app, ["ship", str(tmp_path / "nope.jsonl"), *base[1:]])
    assert missing.exit_code == 2 and "nope.jsonl" in missing.output


def _job(status: str, progress: dict | None = None, rollout: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(status=status, model_extra={"lorafleet": {"progress": progress, "rollout": rollout}})


def test_the_watch_names_each_phase_from_the_job() -> None:
    assert phase_of(_job("validating_files")) == "validation"
    assert phase_of(_job("queued")) == "queue"
    assert phase_of(_job("running", {"step": 3})) == "training"
    assert phase_of(_job("running", {"phase": "gate"})) == "gate"
    assert phase_of(_job("succeeded", rollout={"state": "canary_pending"})) == "rollout start"
    assert phase_of(_job("succeeded", rollout={"state": "canary"})) == "canary"
    assert phase_of(_job("succeeded", rollout={"state": "promoted"})) == "done"
