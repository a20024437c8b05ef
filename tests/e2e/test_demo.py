"""The Gemma demo on the real model: its terms must be accepted first (the demo's screen: tests/unit/)."""

from __future__ import annotations

from pathlib import Path


def test_the_gemma_demo_needs_its_terms_accepted(base_model: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / base_model.name).symlink_to(base_model)  # SmolLM2 is there; Gemma is not
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet", "demo", "--gemma", "--no-serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"LORAFLEET_DATA_DIR": str(tmp_path)},
    )
    assert proc.returncode == 2 and "--accept-license gemma" in proc.stderr, proc.stderr
    assert not (tmp_path / "models" / "gemma-3-270m").exists() and not (tmp_path / "adapters").exists()
