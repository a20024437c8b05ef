"""`lorafleet model pull` on the real model: a second pull does nothing (its refusals: tests/unit/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lorafleet", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def test_second_pull_does_nothing(base_model: Path) -> None:
    before = (base_model / "model.safetensors").stat().st_mtime_ns
    proc = run_cli("model", "pull", env=os.environ | {"LORAFLEET_DATA_DIR": str(ROOT / "var")})
    assert proc.returncode == 0, proc.stderr
    assert "already present" in proc.stdout
    assert (base_model / "model.safetensors").stat().st_mtime_ns == before
