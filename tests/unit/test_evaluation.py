"""`lorafleet eval` with real vLLM on a small held-out set: checks first, then scores base and adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation.run import EvalError, load_examples
from tests.conftest import ROOT


def test_bad_data_is_refused_with_its_line(tmp_path: Path) -> None:
    data = tmp_path / "test.jsonl"
    data.write_text('{"instruction": "x"}\n')
    with pytest.raises(EvalError, match=r"test.jsonl:1: error: field 'output': missing"):
        load_examples(data, None)
    with pytest.raises(EvalError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl", None)


def test_bfcl_answers_are_joined_by_id_and_gaps_are_named(tmp_path: Path) -> None:
    toolcall = ROOT / "data" / "toolcall"
    evalset = load_examples(toolcall / "test.jsonl", None, toolcall / "test_answers.jsonl")
    assert len(evalset.ground_truth) == len(evalset.examples) >= 90 and all(evalset.ground_truth)
    first = evalset.examples[0]
    assert first.id == "simple_python_0" and "calculate_triangle_area" in evalset.ground_truth[0]
    answers = tmp_path / "answers.jsonl"
    answers.write_text((toolcall / "test_answers.jsonl").read_text().splitlines()[1] + "\n[1]\n")
    with pytest.raises(EvalError) as exc:
        load_examples(toolcall / "test.jsonl", None, answers)
    assert "answers.jsonl:2: not an answer row" in str(exc.value)
    assert "test.jsonl:1: id 'simple_python_0' has no answer" in str(exc.value)
