"""Scores for one target on one held-out set, built on the shared judge (``contract.judge``).

Every rate carries a 95% Wilson score interval: evaluation sets are small (tens
to hundreds of examples) and the normal approximation misbehaves near 0 and
1, exactly where good adapters live.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from contract.judge import Verdict, judge
from contract.stats import Rate, wilson

# The held-out sets an evaluation scores: the task's own held-out split, and a robustness split phrased unlike
# anything in training (``--robust``).
HELD_OUT = "held-out"
ROBUST = "robust"

__all__ = ["Generation", "Rate", "Scored", "TargetScores", "call_correct", "score", "wilson"]


def call_correct(call: Any, ground_truth: dict[str, dict[str, list[Any]]]) -> bool:
    """BFCL-style call accuracy: right function, every argument one of its acceptable values.

    ``ground_truth`` is ``{function: {argument: [acceptable values]}}``; ``""``
    among the values means the argument may be omitted. Arguments the ground
    truth does not name are wrong.
    """
    if not isinstance(call, dict) or not isinstance(call.get("arguments"), dict):
        return False
    (name, acceptable), *_ = ground_truth.items()
    if call.get("name") != name:
        return False
    args = call["arguments"]
    if set(args) - set(acceptable):
        return False
    for arg, values in acceptable.items():
        if arg not in args:
            if "" not in values:
                return False
        elif not any(_same(args[arg], v) for v in values if v != ""):
            return False
    return True


def _same(got: Any, want: Any) -> bool:
    # BFCL writes 5 and 5.0 interchangeably, and lists where tuples are meant.
    if isinstance(got, int | float) and isinstance(want, int | float) and not isinstance(got, bool):
        return float(got) == float(want)
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want, strict=True))
    if isinstance(got, str) and isinstance(want, str):
        return got.strip() == want.strip()
    return bool(got == want)


@dataclass
class Generation:
    """One model output with what the engine reported about it."""

    text: str
    finish_reason: str | None
    latency_s: float
    output_tokens: int


@dataclass
class Scored:
    generation: Generation
    verdict: Verdict
    call_ok: bool | None = None


@dataclass
class TargetScores:
    """The scores of one target (base or adapter version) in one mode."""

    target: str
    mode: str
    items: list[Scored] = field(default_factory=list)
    wall_s: float = 0.0
    split: str = HELD_OUT  # which held-out set: HELD_OUT, or ROBUST (phrasings unlike training's)

    def rate(self, pick: Any) -> Rate:
        return wilson(sum(1 for s in self.items if pick(s)), len(self.items))

    def summary(self) -> dict[str, Any]:
        n = len(self.items)
        latencies = sorted(s.generation.latency_s for s in self.items)
        tokens = sum(s.generation.output_tokens for s in self.items)
        fields = [s.verdict.field_accuracy for s in self.items if s.verdict.field_accuracy is not None]
        calls = [s for s in self.items if s.call_ok is not None]
        out: dict[str, Any] = {
            "target": self.target,
            "mode": self.mode,
            "split": self.split,
            "n": n,
            "parse_rate": self.rate(lambda s: s.verdict.parsed_ok).as_dict(),
            "schema_valid_rate": self.rate(lambda s: s.verdict.outcome == "valid").as_dict(),
            "truncated_rate": self.rate(lambda s: s.verdict.outcome == "truncated").as_dict(),
            "exact_match_rate": self.rate(lambda s: bool(s.verdict.exact_match)).as_dict(),
            "field_accuracy": statistics.fmean(fields) if fields else None,
            "latency_p50_s": _quantile(latencies, 0.50),
            "latency_p95_s": _quantile(latencies, 0.95),
            "output_tokens": tokens,
            "wall_s": round(self.wall_s, 3),
            "tokens_per_s": tokens / self.wall_s if self.wall_s > 0 else None,
        }
        if calls:
            out["call_accuracy"] = wilson(sum(1 for s in calls if s.call_ok), len(calls)).as_dict()
        return out


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


def score(
    generation: Generation,
    *,
    expected: str | None,
    schema: dict[str, Any] | None,
    ground_truth: dict[str, dict[str, list[Any]]] | None = None,
) -> Scored:
    """Judge one output against its example: the same verdict the gateway counts online."""
    import json

    expected_value = json.loads(expected) if expected is not None else None
    verdict = judge(generation.text, schema, finish_reason=generation.finish_reason, expected=expected_value)
    call_ok = None
    if ground_truth is not None:
        call_ok = verdict.parsed_ok and call_correct(verdict.parsed, ground_truth)
    return Scored(generation, verdict, call_ok)
