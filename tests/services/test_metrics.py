"""The gateway's metrics pass promtool's own check on a live scrape (the rest: tests/unit/test_metrics.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.fakes import chat
from tests.unit.test_metrics import gateway_setup, open_gateway


def test_promtool_accepts_a_live_scrape(tmp_path: Path) -> None:
    settings, keys = gateway_setup(tmp_path)
    for client, _ in open_gateway(settings):  # one gateway, closed when the loop ends
        chat(client, keys["acme"])
        chat(client, keys["acme"], stream=True)
        chat(client, "lf-wrong")
        exposition = client.get("/metrics").text
    assert shutil.which("promtool"), "promtool is missing: `apt-get install prometheus` (make test does it)"
    lint = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
