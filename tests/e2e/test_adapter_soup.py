"""The adapter-soup benchmark end to end: a smoke run on real adapters (its counts: tests/unit/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_a_smoke_run_scores_both_soups_and_each_adapter(flag_adapters: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "soup.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.adapter_soup",
        str(flag_adapters["good"]),
        str(flag_adapters["good2"]),
        "--limit",
        "1",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rank = json.loads((flag_adapters["good"] / "adapter_config.json").read_text())["r"]
    assert [r["adapter"] for r in rows] == ["soup", f"soup{rank}", "seed-run-0", "seed-run-1"]
    assert rows[0]["source"] == f"mean of 2, rank {2 * rank}" and rows[1]["source"] == f"mean of 2, rank {rank}"
    assert all(len(r["calls_ok"]) == 1 for r in rows)
    assert "| soup | mean of 2" in done.stdout and "questions right in at least one" in done.stdout
