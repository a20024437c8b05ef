"""The judge's verdicts: parse → truncation → schema → fields."""

from __future__ import annotations

import json

from contract.judge import field_accuracy, judge
from tests.conftest import orders_schema

GOOD = {"customer": {"name": "John Doe", "email": "john@example.com"}, "order_id": "12345", "status": "processing"}


def test_valid_output_with_exact_match() -> None:
    v = judge(json.dumps(GOOD), orders_schema(), expected=GOOD)
    assert (v.outcome, v.errors, v.exact_match, v.field_accuracy) == ("valid", [], True, 1.0)


def test_code_fence_is_invalid_json() -> None:
    v = judge("```json\n" + json.dumps(GOOD) + "\n```", orders_schema())
    assert v.outcome == "invalid_json" and "not JSON" in v.errors[0]


def test_cut_off_output_is_truncated_only_when_stopped_at_length() -> None:
    text = json.dumps(GOOD)[:30]
    assert judge(text, orders_schema(), finish_reason="length").outcome == "truncated"
    assert judge(text, orders_schema(), finish_reason="stop").outcome == "invalid_json"


def test_schema_mismatch_names_the_json_path() -> None:
    bad = GOOD | {"status": "lost", "extra": 1}
    v = judge(json.dumps(bad), orders_schema())
    assert v.outcome == "schema_mismatch"
    assert any(e.startswith("$.status:") for e in v.errors)
    assert any("extra" in e for e in v.errors)


def test_field_accuracy_counts_missing_extra_and_wrong_leaves() -> None:
    got = {"customer": {"name": "John Doe", "email": "x@y.z"}, "status": "processing", "note": "hi"}
    # leaves: name ok, email wrong, order_id missing, status ok, note extra → 2 of 5
    assert field_accuracy(got, GOOD) == 2 / 5
    assert judge(json.dumps(got), expected=GOOD).exact_match is False
