"""The adapter-soup benchmark (benchmarks/adapter_soup.py): its ensemble counts, and one smoke run end to end."""

from __future__ import annotations

import subprocess
import sys

from benchmarks.adapter_soup import agreement
from tests.conftest import ROOT


def test_agreement_counts_questions_right_in_any_a_majority_and_all_runs() -> None:
    runs = [[True, True, False, False], [True, False, True, False], [True, True, False, False]]
    assert agreement(runs) == {"any": 3, "majority": 2, "all": 1}


def test_one_adapter_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.adapter_soup", "x"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "at least two adapter directories" in done.stderr
