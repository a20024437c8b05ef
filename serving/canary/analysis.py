"""The pure part of a canary: its config, what each variant served, and the comparison that decides.

Nothing here touches the database, the store or the clock beyond time stamps:
``analyze`` is a function of two windows and a config, and ``user_point`` of a
canary id and a user.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from contract.stats import mann_whitney_greater, two_proportion_drop
from serving.records import RequestRecord


class CanaryConfig(BaseModel):
    """A canary's steps and thresholds (defaults after Flagger and Kayenta; tests use short intervals)."""

    model_config = ConfigDict(extra="forbid")

    steps: list[int] = Field(
        default=[5, 25, 50, 100],
        min_length=1,
        max_length=20,
        description="Candidate weights in %, rising; reaching 100 promotes.",
    )
    interval_s: float = Field(default=60.0, ge=0.5, le=86_400, description="Analysis interval per step.")
    min_samples: int = Field(default=50, ge=1, le=1_000_000, description="Requests per variant before judging.")
    max_validity_drop: float = Field(default=0.02, ge=0, le=1, description="Tolerated drop in JSON validity.")
    max_error_increase: float = Field(default=0.01, ge=0, le=1, description="Tolerated rise in the 5xx rate.")
    max_latency_ratio: float = Field(default=1.5, ge=1, le=100, description="Tolerated candidate/stable p95 latency.")
    confidence: float = Field(default=0.95, ge=0.5, lt=1, description="Of each test (alpha = 1 - confidence).")

    @field_validator("steps")
    @classmethod
    def _rising(cls, steps: list[int]) -> list[int]:
        if any(not 1 <= s <= 100 for s in steps) or any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError("steps must be rising weights between 1 and 100, e.g. [5, 25, 50, 100]")
        return steps


@dataclass
class Window:
    """What one variant served since the step began."""

    requests: int = 0
    errors: int = 0
    checked: int = 0
    valid: int = 0
    cut_by_client: int = 0  # answers cut at the client's own max_tokens: not judged as JSON
    per_token: list[float] = field(default_factory=list)  # seconds per output token (TPOT for streams)
    ttft: list[float] = field(default_factory=list)

    def add(self, record: RequestRecord) -> None:
        """One request's sample. What the client chose does not count against the version: its 4xx, the JSON
        verdict of a schema or JSON mode it chose itself (only the alias's own are judged), and of an answer cut
        by its own ``max_tokens``; latency is per output token, so a client asking for short answers (or long
        ones) does not move it."""
        if 400 <= record.status < 500 or record.status == 499:
            return  # the client's mistake (or its disconnect) says nothing about the version
        if not record.json_judged and record.status >= 500:
            return  # a failure on a schema or tools the client brought: the client's choice, not the version's
        self.requests += 1
        if (
            record.status >= 500
            or record.status == 0
            or record.error_code in ("engine_stream_broken", "engine_stream_error")
        ):
            self.errors += 1
            return
        per_token = record.tpot if record.stream else _per_token(record)
        if per_token is not None:
            self.per_token.append(per_token)
        if record.ttft is not None:
            self.ttft.append(record.ttft)
        if not record.json_judged:
            return  # a schema or a JSON mode the client chose: its verdict is about the client's choice
        for outcome in record.json_outcomes:
            if outcome == "truncated" and record.client_max_tokens:
                self.cut_by_client += 1
                continue
            self.checked += 1
            self.valid += outcome == "valid"

    def summary(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "json_checked": self.checked,
            "valid": self.valid,
            "cut_by_client": self.cut_by_client,
            "streams": len(self.ttft),
        }

    def to_json(self) -> str:
        """The compact form one gateway shares with the others: the counts, and each latency as a sketch (how
        many samples fell in each 1%-wide logarithmic bucket), whatever the number of requests."""
        counts = {k: getattr(self, k) for k in ("requests", "errors", "checked", "valid", "cut_by_client")}
        return json.dumps(counts | {"per_token": _sketch(self.per_token), "ttft": _sketch(self.ttft)})

    @classmethod
    def merged(cls, shared: list[str]) -> Window:
        """The windows several gateways shared (``to_json``), as one; each latency at its bucket's middle (within
        0.5%: the tests and the p95 see the same order of samples, up to ties within a bucket)."""
        total = cls()
        for text in shared:
            part = json.loads(text)
            for key in ("requests", "errors", "checked", "valid", "cut_by_client"):
                setattr(total, key, getattr(total, key) + int(part[key]))
            total.per_token += _unsketch(part["per_token"])
            total.ttft += _unsketch(part["ttft"])
        return total


SKETCH_BASE = 1.01  # bucket width: 1%


def _sketch(values: list[float]) -> dict[str, int]:
    buckets: dict[str, int] = {}
    for value in values:
        key = "z" if value <= 0 else str(math.floor(math.log(value, SKETCH_BASE)))
        buckets[key] = buckets.get(key, 0) + 1
    return buckets


def _unsketch(buckets: dict[str, int]) -> list[float]:
    out: list[float] = []
    for key, count in buckets.items():
        out += [0.0 if key == "z" else SKETCH_BASE ** (int(key) + 0.5)] * int(count)
    return out


def _per_token(record: RequestRecord) -> float | None:
    if not record.completion_tokens or record.finished is None:
        return None
    return (record.finished - record.started) / record.completion_tokens


@dataclass
class Analysis:
    decision: Literal["wait", "rollback", "pass"]
    reason: str
    metrics: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "reason": self.reason, "metrics": self.metrics, "at": time.time()}


def analyze(stable: Window, canary: Window, config: CanaryConfig) -> Analysis:
    """Compare the variants' windows: wait for samples, roll back on a significant regression, else pass."""
    alpha = 1 - config.confidence
    need = config.min_samples
    if min(stable.requests, canary.requests) < need:
        return Analysis(
            "wait", f"waiting for samples: stable {stable.requests}, canary {canary.requests}, need {need} each", []
        )
    metrics: list[dict[str, Any]] = []
    if stable.checked or canary.checked:
        if min(stable.checked, canary.checked) < need:
            waiting = f"stable {stable.checked}, canary {canary.checked}, need {need} each"
            return Analysis("wait", f"waiting for JSON-checked answers: {waiting}", [])
        valid = (stable.valid, stable.checked, canary.valid, canary.checked)
        metrics.append(_rate("json_validity", *valid, margin=config.max_validity_drop, unit="validity", alpha=alpha))
    succeeded = (stable.requests - stable.errors, stable.requests, canary.requests - canary.errors, canary.requests)
    metrics.append(_rate("success_rate", *succeeded, margin=config.max_error_increase, unit="success", alpha=alpha))
    for name, s, c in (("time_per_token", stable.per_token, canary.per_token), ("ttft", stable.ttft, canary.ttft)):
        metrics.append(_latency(name, s, c, need=need, max_ratio=config.max_latency_ratio, alpha=alpha))
    regressions = [m["metric"] for m in metrics if m["regression"]]
    if regressions:
        return Analysis(
            "rollback",
            f"significant regression at {config.confidence:.0%} confidence: " + ", ".join(regressions),
            metrics,
        )
    return Analysis("pass", "no significant regression", metrics)


def _rate(
    name: str, s_ok: int, s_n: int, c_ok: int, c_n: int, *, margin: float, unit: str, alpha: float
) -> dict[str, Any]:
    """A rate (JSON validity, success) compared: a regression is a drop beyond ``margin`` the test finds
    significant at ``alpha``."""
    drop = two_proportion_drop(s_ok, s_n, c_ok, c_n, margin=margin)
    return {
        "metric": name,
        "stable": drop.baseline,
        "canary": drop.candidate,
        "n_stable": s_n,
        "n_canary": c_n,
        "threshold": f"{unit} drop <= {margin:g}",
        "p_value": drop.p_value,
        "test": drop.test,
        "regression": drop.drop > margin and drop.significant(alpha),
    }


def _latency(name: str, s: list[float], c: list[float], *, need: int, max_ratio: float, alpha: float) -> dict[str, Any]:
    """A latency compared: a regression is a p95 above ``max_ratio`` × stable's with a shift the Mann-Whitney
    test finds significant at ``alpha``; with fewer than ``need`` samples a side, not judged."""
    if min(len(s), len(c)) < need:
        note = f"not judged: fewer than {need} samples per variant"
        return {"metric": name, "n_stable": len(s), "n_canary": len(c), "regression": False, "note": note}
    shift = mann_whitney_greater(s, c)
    ratio = _p95(c) / _p95(s) if _p95(s) > 0 else 1.0
    return {
        "metric": name,
        "stable": _p95(s),
        "canary": _p95(c),
        "p95_ratio": ratio,
        "n_stable": len(s),
        "n_canary": len(c),
        "p_value": shift.p_value,
        "test": shift.test,
        "threshold": f"p95 ratio <= {max_ratio:g}",
        "regression": ratio > max_ratio and shift.significant(alpha),
    }


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def user_point(canary_id: int, user: str) -> float:
    """The user's fixed point in [0, 1) for this canary."""
    digest = hashlib.sha256(f"{canary_id}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
