"""The evaluation gate: does a candidate adapter version deserve to serve?

Three kinds of check, per candidate and per mode evaluated:

- ``schema_valid``: the schema-valid rate is at least ``min_valid``;
- ``field_accuracy``: the mean field-level accuracy is at least ``min_field_accuracy``
  (only where expected outputs are structured);
- ``regression:<metric>``: against the current stable version *measured in the
  same run on the same examples*, the candidate is not worse by more than
  ``max_drop`` on schema validity, exact match and (for function calls) call
  accuracy. A drop counts only when it is statistically significant: an exact
  one-sided McNemar test on the paired outcomes at level ``alpha``. Noise on a
  200-example set cannot fail a gate; a real regression cannot hide in it.

The verdict is recorded beside the version in the store (``gate.json``), and
``AdapterStore.promote`` refuses a version without a passing one unless forced.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from contract.stats import paired_drop
from evaluation.scores import HELD_OUT, Scored, TargetScores

REGRESSION_METRICS = {
    "schema_valid": lambda s: s.verdict.outcome == "valid",
    "exact_match": lambda s: bool(s.verdict.exact_match),
    "call_accuracy": lambda s: bool(s.call_ok),
}


@dataclass(frozen=True)
class Thresholds:
    min_valid: float = 0.95
    min_field_accuracy: float = 0.90
    max_drop: float = 0.02
    alpha: float = 0.05

    def __post_init__(self) -> None:
        for name in ("min_valid", "min_field_accuracy", "max_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")


@dataclass(frozen=True)
class Check:
    name: str
    mode: str
    passed: bool
    value: float | None
    threshold: float
    detail: str
    split: str = HELD_OUT

    @property
    def where(self) -> str:
        """The mode, and the held-out set when it is not the task's own: ``constrained (robust)``."""
        return self.mode if self.split == HELD_OUT else f"{self.mode} ({self.split})"


@dataclass
class GateVerdict:
    target: str
    stable: str | None
    thresholds: Thresholds
    checks: list[Check] = field(default_factory=list)
    at: float = field(default_factory=time.time)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "passed": self.passed,
            "stable": self.stable,
            "thresholds": asdict(self.thresholds),
            "checks": [asdict(c) for c in self.checks],
            "at": self.at,
        }


def apply_gate(
    results: list[TargetScores], candidates: list[str], stable: str | None, thresholds: Thresholds
) -> list[GateVerdict]:
    """One verdict per candidate target, from results that include the stable version (if any): every check on
    every mode of every held-out set evaluated (the robustness split too, when there is one)."""
    by_key = {(r.target, r.mode, r.split): r for r in results}
    verdicts = []
    for candidate in candidates:
        verdict = GateVerdict(candidate, stable, thresholds)
        for (target, mode, split), scores in by_key.items():
            if target != candidate:
                continue
            verdict.checks += _absolute_checks(scores, thresholds)
            baseline = by_key.get((stable, mode, split)) if stable and stable != candidate else None
            if baseline is not None:
                verdict.checks += _regression_checks(baseline, scores, thresholds)
        verdicts.append(verdict)
    return verdicts


def _absolute_checks(scores: TargetScores, t: Thresholds) -> list[Check]:
    summary = scores.summary()
    valid = summary["schema_valid_rate"]
    checks = [
        Check(
            "schema_valid",
            scores.mode,
            valid["value"] >= t.min_valid,
            valid["value"],
            t.min_valid,
            f"{valid['successes']}/{valid['n']} schema-valid (95% CI {valid['low']:.3f}-{valid['high']:.3f})",
            scores.split,
        )
    ]
    accuracy = summary["field_accuracy"]
    if accuracy is not None:
        checks.append(
            Check(
                "field_accuracy",
                scores.mode,
                accuracy >= t.min_field_accuracy,
                accuracy,
                t.min_field_accuracy,
                f"mean field accuracy {accuracy:.3f}",
                scores.split,
            )
        )
    return checks


def _regression_checks(baseline: TargetScores, candidate: TargetScores, t: Thresholds) -> list[Check]:
    checks = []
    for metric, pick in REGRESSION_METRICS.items():
        if metric == "call_accuracy" and not _has_calls(candidate.items):
            continue
        test = paired_drop([pick(s) for s in baseline.items], [pick(s) for s in candidate.items])
        failed = test.drop > t.max_drop and test.significant(t.alpha)
        detail = (
            f"{candidate.target} {test.candidate:.3f} vs stable {baseline.target} {test.baseline:.3f} "
            f"(drop {test.drop:+.3f}, {test.test} p={test.p_value:.3g})"
        )
        check = Check(
            f"regression:{metric}", candidate.mode, not failed, test.drop, t.max_drop, detail, candidate.split
        )
        checks.append(check)
    return checks


def _has_calls(items: list[Scored]) -> bool:
    return any(s.call_ok is not None for s in items)
