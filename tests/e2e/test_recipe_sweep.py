"""The recipe sweep end to end: one smoke job trains, generates and scores (its recipes: tests/unit/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

BFCL = ROOT.parent / "shared/data/toolcall"


def test_a_smoke_job_trains_generates_and_scores(base_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.recipe_sweep",
        "--only",
        "shipped",
        "--seeds",
        "0",
        "--max-steps",
        "1",
        "--limit",
        "2",
        "--out",
        str(out),
        "--model",
        str(base_model),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert "error" not in row, row.get("trace")
    assert row["recipe"] == "shipped" and len(row["calls_ok"]) == 2
    assert 0.0 <= row["call_accuracy"] <= 1.0
    assert "| shipped | 1 |" in done.stdout
