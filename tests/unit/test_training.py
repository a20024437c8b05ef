"""Real tiny training runs: what is trained, what is masked, what is written, and that runs are repeatable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ORDERS, ROOT


def run_cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"LORAFLEET_DATA_DIR": str(ROOT / "var")}
    return subprocess.run(
        [sys.executable, "-m", "lorafleet", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, **kw
    )  # type: ignore[call-overload]


def test_unservable_adapters_are_refused_before_loading_anything(tmp_path: Path) -> None:
    proc = run_cli(
        "train",
        "--data",
        str(ORDERS / "train.jsonl"),
        "--out",
        str(tmp_path / "x"),
        "--dora",
        "--rank",
        "64",
        "--targets",
        "q_proj,lm_head",
    )
    assert proc.returncode == 2
    for needle in ("vLLM cannot serve DoRA", "rank: 64 exceeds the serving max_lora_rank 16", "['lm_head']"):
        assert needle in proc.stderr
    assert not (tmp_path / "x.partial").exists()


def test_the_stop_handler_asks_once_then_interrupts_and_is_restored() -> None:
    from training.progress import StopOnSignal

    before = signal.getsignal(signal.SIGINT)
    stop = StopOnSignal()
    with stop:
        os.kill(os.getpid(), signal.SIGINT)  # first Ctrl-C: finish the step, save, stop
        assert stop._asked
        with pytest.raises(KeyboardInterrupt):  # a second one does not wait
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
