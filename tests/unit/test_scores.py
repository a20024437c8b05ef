"""Evaluation scores: Wilson intervals, BFCL call accuracy, and aggregation over the shared judge."""

from __future__ import annotations

import json

import pytest

from evaluation.scores import Generation, TargetScores, call_correct, score, wilson
from tests.conftest import orders_schema

GOOD = {"customer": {"name": "A B", "email": "a@b.io"}, "order_id": "1", "status": "pending"}
TRUTH = {"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634), (95, 100, 0.8882, 0.9785)],
)
def test_wilson_interval_matches_reference_values(k: int, n: int, low: float, high: float) -> None:
    rate = wilson(k, n)
    assert rate.low == pytest.approx(low, abs=1e-4) and rate.high == pytest.approx(high, abs=1e-4)
    assert rate.value == k / n


def test_wilson_with_no_samples_says_nothing_is_known() -> None:
    rate = wilson(0, 0)
    assert (rate.low, rate.high) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("call", "ok"),
    [
        ({"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}, True),  # optional omitted
        ({"name": "calculate_triangle_area", "arguments": {"base": 10.0, "height": 5, "unit": "units"}}, True),
        ({"name": "calculate_triangle_area", "arguments": {"base": 10}}, False),  # required missing
        ({"name": "calculate_triangle_area", "arguments": {"base": 11, "height": 5}}, False),  # wrong value
        ({"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5, "colour": "red"}}, False),
        ({"name": "triangle_area", "arguments": {"base": 10, "height": 5}}, False),  # wrong function
        ({"name": "calculate_triangle_area", "arguments": {"base": True, "height": 5}}, False),  # bool is not 10
        ({"name": "calculate_triangle_area"}, False),
        ([1, 2], False),
    ],
)
def test_bfcl_call_accuracy(call: object, ok: bool) -> None:
    assert call_correct(call, TRUTH) is ok


def test_target_summary_aggregates_verdicts() -> None:
    outputs = [
        (json.dumps(GOOD), "stop"),
        (json.dumps(GOOD | {"status": "lost"}), "stop"),
        ("```json\n{}\n```", "stop"),
        (json.dumps(GOOD)[:20], "length"),
    ]
    scores = TargetScores("orders@1", "unconstrained")
    for i, (text, finish) in enumerate(outputs):
        gen = Generation(text, finish, latency_s=0.1 * (i + 1), output_tokens=10)
        scores.items.append(score(gen, expected=json.dumps(GOOD), schema=orders_schema()))
    s = scores.summary()
    assert s["n"] == 4
    assert s["parse_rate"]["successes"] == 2
    assert s["schema_valid_rate"]["successes"] == 1
    assert s["truncated_rate"]["successes"] == 1
    assert s["exact_match_rate"]["successes"] == 1
    assert s["field_accuracy"] == pytest.approx((1.0 + 3 / 4) / 2)
    assert s["latency_p50_s"] == pytest.approx(0.2) and s["latency_p95_s"] == pytest.approx(0.4)
    assert "call_accuracy" not in s


def test_call_accuracy_is_reported_when_ground_truth_is_known() -> None:
    gen = Generation(
        json.dumps({"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}), "stop", 0.1, 5
    )
    scores = TargetScores("toolcall@1", "constrained", [score(gen, expected=None, schema=None, ground_truth=TRUTH)])
    assert scores.summary()["call_accuracy"]["successes"] == 1
