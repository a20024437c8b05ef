"""The evaluation gate, its statistics, the promotion rule it guards, and the reports: no engine needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract.examples import Example
from contract.stats import paired_drop, two_proportion_drop
from contract.store import AdapterStore, StoreError
from evaluation.gate import Thresholds, apply_gate
from evaluation.report import write_report
from evaluation.run import EvalSet
from evaluation.scores import HELD_OUT, ROBUST, Generation, TargetScores, score
from tests.conftest import make_adapter, orders_schema

GOOD = {"customer": {"name": "Ann Lee", "email": "ann@x.io"}, "order_id": "7", "status": "shipped"}
WRONG_STATUS = GOOD | {"status": "pending"}


def evalset(n: int) -> EvalSet:
    examples = [
        Example([{"role": "user", "content": f"order {i}"}], json.dumps(GOOD), orders_schema(), line=i + 1)
        for i in range(n)
    ]
    return EvalSet(Path("test.jsonl"), examples)


def scored(target: str, outputs: list[str], mode: str = "unconstrained", split: str = HELD_OUT) -> TargetScores:
    scores = TargetScores(target, mode, wall_s=1.0, split=split)
    for text in outputs:
        gen = Generation(text, "stop", 0.1, 20)
        scores.items.append(score(gen, expected=json.dumps(GOOD), schema=orders_schema()))
    return scores


def outputs(right: int, wrong: int = 0, broken: int = 0) -> list[str]:
    return [json.dumps(GOOD)] * right + [json.dumps(WRONG_STATUS)] * wrong + ["Sure! ```json"] * broken


# -- statistics -------------------------------------------------------------------------------


def test_paired_drop_is_the_exact_mcnemar_tail() -> None:
    # 5 examples the baseline got right and the candidate wrong, none the other way: p = 1/32.
    test = paired_drop([True] * 10, [True] * 5 + [False] * 5)
    assert test.p_value == pytest.approx(1 / 32) and test.drop == pytest.approx(0.5)
    # Discordant pairs both ways cancel out: no evidence of a drop.
    assert paired_drop([True, False] * 5, [False, True] * 5).p_value > 0.5
    assert paired_drop([True] * 4, [True] * 4).p_value == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        paired_drop([True], [True, False])


def test_two_proportion_drop_tolerates_its_margin() -> None:
    clear = two_proportion_drop(990, 1000, 900, 1000)
    assert clear.significant(0.01)
    within_margin = two_proportion_drop(990, 1000, 980, 1000, margin=0.02)
    assert not within_margin.significant(0.05)
    assert not two_proportion_drop(0, 0, 5, 10).significant(0.05)  # no data is never a regression
    assert two_proportion_drop(10, 10, 0, 10).p_value == 0.0


# -- the gate ----------------------------------------------------------------------------------


def test_gate_passes_a_good_candidate_with_no_stable_version() -> None:
    [verdict] = apply_gate([scored("orders@2", outputs(100))], ["orders@2"], None, Thresholds())
    assert verdict.passed and {c.name for c in verdict.checks} == {"schema_valid", "field_accuracy"}


def test_gate_fails_below_the_validity_threshold_and_says_which() -> None:
    [verdict] = apply_gate([scored("orders@2", outputs(90, broken=10))], ["orders@2"], None, Thresholds())
    assert not verdict.passed
    [failure] = verdict.failures
    assert failure.name == "schema_valid" and failure.value == pytest.approx(0.9) and "90/100" in failure.detail


def test_gate_counts_only_a_significant_regression_against_stable() -> None:
    stable = scored("orders@1", outputs(200))
    noisy = scored("orders@2", outputs(197, wrong=3))  # 1.5 points worse: inside the margin
    worse = scored("orders@3", outputs(180, wrong=20))  # 10 points worse, 20 discordant pairs: p < 1e-5
    verdicts = apply_gate(
        [stable, noisy, worse], ["orders@2", "orders@3"], "orders@1", Thresholds(min_field_accuracy=0.5)
    )
    by_target = {v.target: v for v in verdicts}
    assert by_target["orders@2"].passed
    [failure] = by_target["orders@3"].failures
    assert failure.name == "regression:exact_match" and "mcnemar" in failure.detail
    assert "orders@3 0.900 vs stable orders@1 1.000" in failure.detail


def test_gate_judges_the_robustness_split_on_its_own() -> None:
    """A candidate that holds on the task's own held-out split but not on phrasings unlike training fails, the
    failing checks naming the robust split, and its regression is measured against stable on that split alone."""
    results = [
        scored("orders@1", outputs(100)),
        scored("orders@1", outputs(100), split=ROBUST),
        scored("orders@2", outputs(100)),
        scored("orders@2", outputs(80, broken=20), split=ROBUST),
    ]
    (verdict,) = apply_gate(results, ["orders@2"], "orders@1", Thresholds())
    assert not verdict.passed
    failed = {(c.name, c.where) for c in verdict.failures}
    assert ("schema_valid", "unconstrained (robust)") in failed
    assert ("regression:schema_valid", "unconstrained (robust)") in failed
    assert all(c.split == ROBUST for c in verdict.failures)
    assert {c.split for c in verdict.checks} == {HELD_OUT, ROBUST}


@pytest.mark.parametrize("field", ["min_valid", "max_drop", "alpha"])
def test_thresholds_out_of_range_are_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Thresholds(**{field: 1.5})


# -- promotion needs a passing gate -------------------------------------------------------------


def test_promotion_requires_a_passing_gate_unless_forced(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "store")
    v1 = store.publish(make_adapter(tmp_path / "a"), "orders")
    v2 = store.publish(make_adapter(tmp_path / "b"), "orders")
    assert store.serving("orders") == v2  # no stable version yet: the newest serves
    with pytest.raises(StoreError, match="orders@1 has no evaluation gate verdict"):
        store.promote("orders", 1)
    store.record_gate(v1, {"passed": True})
    assert store.promote("orders", 1)["action"] == "promote"
    assert store.serving("orders") == v1  # a newer version no longer serves by itself
    store.record_gate(v2, {"passed": False})
    with pytest.raises(StoreError, match="orders@2 failed its evaluation gate"):
        store.promote("orders", 2)
    event = store.promote("orders", 2, force=True, reason="hotfix")
    assert event["forced"] and event["gate_passed"] is False and event["from"] == 1
    # Rolling back to a version that was stable before needs no new gate.
    store.record_gate(v1, {"passed": False})
    assert store.promote("orders", 1)["action"] == "rollback"
    assert [(e["action"], e["to"], e["forced"]) for e in store.events("orders")] == [
        ("promote", 1, False),
        ("promote", 2, True),
        ("rollback", 1, False),
    ]
    with pytest.raises(StoreError, match="no version 9"):
        store.promote("orders", 9, force=True)


# -- reports -----------------------------------------------------------------------------------


def test_report_lists_worst_failures_first_and_writes_every_file(tmp_path: Path) -> None:
    es = evalset(30)
    results = [
        scored("base", outputs(0, broken=30)),
        scored("orders@1", outputs(27, wrong=2, broken=1)),
    ]
    [verdict] = apply_gate(results, ["orders@1"], None, Thresholds())
    report = write_report(results, es, tmp_path, gates=[verdict], review=8)
    assert report["failures"] == 33 and report["gates"][0]["passed"] is True
    failures = [json.loads(x) for x in (tmp_path / "failures.jsonl").read_text().splitlines()]
    ours = [f for f in failures if f["target"] == "orders@1"]
    assert [f["outcome"] for f in ours] == ["invalid_json", "valid", "valid"]
    assert "$.status: expected 'shipped', got 'pending'" in ours[1]["errors"]
    md = (tmp_path / "report.md").read_text()
    assert "## Gate: orders@1 PASSED" in md and "### orders@1, unconstrained" in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "review.csv").read_text().splitlines()
    assert len(rows) == 9 and rows[0].startswith("line,prompt,expected,base (unconstrained),orders@1 (unconstrained)")
    assert (tmp_path / "review.html").read_text().count("<tr>") == 9
