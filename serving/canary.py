"""Canary rollouts: a candidate version takes a growing share of an alias's traffic until the numbers decide.

    start ──► step 1 (5%) ──► step 2 (25%) ──► ... ──► promoted (100%: the stable pointer moves)
                   │ regression at any analysis
                   ▼
              rolled back (the candidate is retired; stable kept serving throughout)

Assignment is sticky and deterministic: a user (the request's ``user`` field,
else the ``X-Lorafleet-User`` header, else the API key) hashes to a point in
[0, 1); the candidate serves users below the current weight. The point does
not depend on the step, so a user who saw the candidate keeps seeing it as the
weight grows.

Every ``interval_s`` the gateway compares what each variant served in the
step's window (``analyze``): JSON validity and error rate with one-sided
two-proportion tests (a drop beyond the tolerated margin), end-to-end latency
and time to first token with one-sided Mann-Whitney U tests (a regression is
a p95 above ``max_latency_ratio`` × stable's that the test finds
significant), each at ``confidence``. Too few samples: wait
(and say so), never promote. A significant regression: roll back at once.
Otherwise: next step, and after the last one, promote.

Canaries and their audit events live in the state database, so a canary
survives a gateway restart; the samples of the step under way do not (the
window starts again, which is recorded).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from contract.stats import mann_whitney_greater, two_proportion_drop
from contract.store import AdapterStore, AdapterVersion, StoreError, VersionNotFound
from serving.adapters import AdapterRegistry
from serving.metrics import GatewayMetrics, RequestRecord
from serving.tenants import metadata

log = logging.getLogger("lorafleet.canary")

State = Literal["running", "paused", "promoted", "rolled_back", "aborted"]
ACTIVE = ("running", "paused")
Variant = Literal["stable", "canary"]

canaries_table = sa.Table(
    "canaries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("alias", sa.String(64), nullable=False, index=True),
    sa.Column("candidate", sa.Integer, nullable=False),
    sa.Column("stable", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("forced", sa.Boolean, nullable=False),
    sa.Column("step_started_at", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_analysis", sa.Text, nullable=True),
)
events_table = sa.Table(
    "canary_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("canary_id", sa.ForeignKey("canaries.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("numbers", sa.Text, nullable=True),
    sa.Column("actor", sa.String(64), nullable=False),
)


class CanaryConfig(BaseModel):
    """A canary's steps and thresholds (defaults after Flagger and Kayenta; tests use short intervals)."""

    model_config = ConfigDict(extra="forbid")

    steps: list[int] = Field(default=[5, 25, 50, 100], min_length=1, max_length=20,
                             description="Candidate weights in %, rising; reaching 100 promotes.")  # fmt: skip
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


class CanaryError(Exception):
    """A canary operation was refused; ``status`` is the HTTP status the admin API answers with."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class Canary:
    id: int
    alias: str
    candidate: int
    stable: int
    state: State
    step: int
    config: CanaryConfig
    forced: bool
    step_started_at: float
    created_at: float
    last_analysis: dict[str, Any] | None = None

    @property
    def weight(self) -> float:
        """Share of users on the candidate now (0-1)."""
        return self.config.steps[self.step] / 100 if self.state in ACTIVE else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "alias": self.alias, "candidate": self.candidate, "stable": self.stable,
            "state": self.state, "step": self.step + 1, "steps": self.config.steps, "weight": self.weight,
            "step_started_at": self.step_started_at, "created_at": self.created_at, "forced": self.forced,
            "config": self.config.model_dump(), "last_analysis": self.last_analysis,
        }  # fmt: skip


@dataclass
class Window:
    """What one variant served since the step began."""

    requests: int = 0
    errors: int = 0
    checked: int = 0
    valid: int = 0
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)

    def add(self, record: RequestRecord) -> None:
        if 400 <= record.status < 500:
            return  # the client's mistake says nothing about the version
        self.requests += 1
        if record.status >= 500 or record.status == 0:
            self.errors += 1
            return
        self.latency.append(record.latency)
        if record.ttft is not None:
            self.ttft.append(record.ttft)
        for outcome in record.json_outcomes:
            self.checked += 1
            self.valid += outcome == "valid"

    def summary(self) -> dict[str, int]:
        return {"requests": self.requests, "errors": self.errors, "json_checked": self.checked, "valid": self.valid,
                "streams": len(self.ttft)}  # fmt: skip


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
        return Analysis("wait", f"waiting for samples: stable {stable.requests}, canary {canary.requests}, "
                        f"need {need} each", [])  # fmt: skip
    metrics: list[dict[str, Any]] = []

    def rate(name: str, s_ok: int, s_n: int, c_ok: int, c_n: int, margin: float, unit: str) -> None:
        drop = two_proportion_drop(s_ok, s_n, c_ok, c_n, margin=margin)
        metrics.append({"metric": name, "stable": drop.baseline, "canary": drop.candidate, "n_stable": s_n,
                        "n_canary": c_n, "threshold": f"{unit} drop <= {margin:g}", "p_value": drop.p_value,
                        "test": drop.test, "regression": drop.drop > margin and drop.significant(alpha)})  # fmt: skip

    def latency(name: str, s: list[float], c: list[float]) -> None:
        if min(len(s), len(c)) < need:
            metrics.append({"metric": name, "n_stable": len(s), "n_canary": len(c), "regression": False,
                            "note": f"not judged: fewer than {need} samples per variant"})  # fmt: skip
            return
        shift = mann_whitney_greater(s, c)
        ratio = _p95(c) / _p95(s) if _p95(s) > 0 else 1.0
        metrics.append({"metric": name, "stable": _p95(s), "canary": _p95(c), "p95_ratio": ratio,
                        "n_stable": len(s), "n_canary": len(c), "p_value": shift.p_value, "test": shift.test,
                        "threshold": f"p95 ratio <= {config.max_latency_ratio:g}",
                        "regression": ratio > config.max_latency_ratio and shift.significant(alpha)})  # fmt: skip

    if stable.checked or canary.checked:
        if min(stable.checked, canary.checked) < need:
            return Analysis("wait", f"waiting for JSON-checked answers: stable {stable.checked}, canary "
                            f"{canary.checked}, need {need} each", [])  # fmt: skip
        rate("json_validity", stable.valid, stable.checked, canary.valid, canary.checked, config.max_validity_drop,
             "validity")  # fmt: skip
    rate("success_rate", stable.requests - stable.errors, stable.requests, canary.requests - canary.errors,
         canary.requests, config.max_error_increase, "success")  # fmt: skip
    latency("latency_e2e", stable.latency, canary.latency)
    latency("ttft", stable.ttft, canary.ttft)
    regressions = [m["metric"] for m in metrics if m["regression"]]
    if regressions:
        return Analysis("rollback", f"significant regression at {config.confidence:.0%} confidence: "
                        + ", ".join(regressions), metrics)  # fmt: skip
    return Analysis("pass", "no significant regression", metrics)


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def user_point(canary_id: int, user: str) -> float:
    """The user's fixed point in [0, 1) for this canary."""
    digest = hashlib.sha256(f"{canary_id}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class CanaryManager:
    def __init__(self, engine: sa.Engine, registry: AdapterRegistry, metrics: GatewayMetrics | None = None) -> None:
        self.db, self.registry, self.metrics = engine, registry, metrics
        metadata.create_all(engine, tables=[canaries_table, events_table])
        self.windows: dict[int, dict[str, Window]] = {}
        self.active: dict[str, Canary] = {}
        for canary in self._load_active():
            self.active[canary.alias] = canary
            canary.step_started_at = time.time()
            self._save(canary)
            self._event(canary, "resume_after_restart", "the gateway restarted: this step's window starts again")

    @property
    def store(self) -> AdapterStore:
        return self.registry.store

    # -- reads ------------------------------------------------------------------------------------

    def _load_active(self) -> list[Canary]:
        with self.db.connect() as db:
            rows = db.execute(sa.select(canaries_table).where(canaries_table.c.state.in_(ACTIVE))).all()
        return [self._row(r) for r in rows]

    @staticmethod
    def _row(row: Any) -> Canary:
        return Canary(row.id, row.alias, row.candidate, row.stable, row.state, row.step,
                      CanaryConfig.model_validate_json(row.config), row.forced, row.step_started_at, row.created_at,
                      json.loads(row.last_analysis) if row.last_analysis else None)  # fmt: skip

    def latest(self, alias: str) -> Canary:
        """The alias's active canary, else its most recent one."""
        if alias in self.active:
            return self.active[alias]
        with self.db.connect() as db:
            row = db.execute(sa.select(canaries_table).where(canaries_table.c.alias == alias)
                             .order_by(canaries_table.c.id.desc()).limit(1)).first()  # fmt: skip
        if row is None:
            raise CanaryError(404, f"alias {alias!r} has had no canary; start one first", "no_canary")
        return self._row(row)

    def status(self, alias: str) -> dict[str, Any]:
        canary = self.latest(alias)
        windows = self.windows.get(canary.id, {})
        return canary.as_dict() | {
            "window": {v: windows.get(v, Window()).summary() for v in ("stable", "canary")},
            "window_age_s": round(time.time() - canary.step_started_at, 1) if canary.state in ACTIVE else None,
        }

    def events(self, alias: str) -> list[dict[str, Any]]:
        with self.db.connect() as db:
            rows = db.execute(sa.select(events_table).where(events_table.c.alias == alias)
                              .order_by(events_table.c.id)).all()  # fmt: skip
        return [{"canary": r.canary_id, "at": r.at, "time": datetime.fromtimestamp(r.at, UTC).isoformat(),
                 "action": r.action, "reason": r.reason, "numbers": json.loads(r.numbers) if r.numbers else None,
                 "actor": r.actor} for r in rows]  # fmt: skip

    def weights(self) -> dict[str, float]:
        return {alias: canary.weight for alias, canary in self.active.items()}

    # -- serving ----------------------------------------------------------------------------------

    def assign(self, alias: str, user: str) -> tuple[Variant, AdapterVersion] | None:
        """The variant and version that serve ``user`` on ``alias``, or ``None`` with no canary."""
        canary = self.active.get(alias)
        if canary is None:
            return None
        if user_point(canary.id, user) < canary.weight:
            return "canary", self.store.get(alias, canary.candidate)
        return "stable", self.store.get(alias, canary.stable)

    def observe(self, canary_id: int, variant: str, record: RequestRecord) -> None:
        if not any(c.id == canary_id for c in self.active.values()):
            return  # the canary ended while this request ran
        self.windows.setdefault(canary_id, {}).setdefault(variant, Window()).add(record)

    # -- decisions --------------------------------------------------------------------------------

    async def start(self, alias: str, version: int, config: CanaryConfig, *, force: bool = False,
                    reason: str = "", actor: str = "admin-api") -> Canary:  # fmt: skip
        if alias in self.active:
            other = self.active[alias]
            raise CanaryError(409, f"alias {alias!r} already has a canary ({alias}@{other.candidate}, "
                              f"{other.state}); abort it or let it finish first", "canary_exists")  # fmt: skip
        if alias not in self.store.aliases():
            raise CanaryError(404, f"no alias {alias!r} in the adapter store", "alias_not_found")
        try:
            target = self.store.get(alias, version)
        except VersionNotFound as exc:
            raise CanaryError(404, str(exc), "adapter_not_found") from exc
        stable = self.store.stable(alias)
        if stable is None:
            raise CanaryError(400, f"alias {alias!r} has no stable version to compare with; promote one first",
                              "no_stable_version")  # fmt: skip
        if stable.version == version:
            raise CanaryError(400, f"{target.ref} is already the stable version", "already_stable")
        if self.store.is_retired(target):
            raise CanaryError(400, f"{target.ref} is retired; publish it again to try it", "version_retired")
        refusal = self.store.gate_refusal(target)
        if refusal and not force:
            raise CanaryError(400, refusal, "gate_required")
        problems = self.registry.fit_problems(target.path)
        if problems:
            raise CanaryError(400, f"{target.ref} cannot be served: " + "; ".join(problems), "adapter_refused")
        if self.registry.engine.is_ready():
            await self.registry.ensure_loaded(target)  # loaded before its first request
        now = time.time()
        with self.db.begin() as db:
            inserted = db.execute(sa.insert(canaries_table).values(
                alias=alias, candidate=version, stable=stable.version, state="running", step=0,
                config=config.model_dump_json(), forced=bool(refusal and force), step_started_at=now, created_at=now,
            )).inserted_primary_key  # fmt: skip
        assert inserted is not None
        canary_id = int(inserted[0])
        canary = self.latest_by_id(canary_id)
        self.active[alias] = canary
        why = f"forced without a passing gate ({refusal})" if refusal and force else "gate passed"
        self._event(canary, "start", f"{reason or 'canary started'}; {why}", {"config": config.model_dump()}, actor)
        log.info("canary %s@%d started at %d%% against %s@%d", alias, version, config.steps[0], alias, stable.version)
        return canary

    def latest_by_id(self, canary_id: int) -> Canary:
        with self.db.connect() as db:
            return self._row(db.execute(sa.select(canaries_table).where(canaries_table.c.id == canary_id)).one())

    async def tick(self, now: float | None = None) -> None:
        """Analyse every running canary whose interval has passed (and keep analysing one that waits)."""
        now = time.time() if now is None else now
        for canary in list(self.active.values()):
            if canary.state != "running" or now - canary.step_started_at < canary.config.interval_s:
                continue
            windows = self.windows.get(canary.id, {})
            analysis = analyze(windows.get("stable", Window()), windows.get("canary", Window()), canary.config)
            waited = (canary.last_analysis or {}).get("decision") == "wait"
            analysed = analysis.as_dict() | {"step": canary.step + 1}
            if analysed != canary.last_analysis:  # a canary waiting with no new samples writes nothing
                canary.last_analysis = analysed
                self._save(canary)
            numbers = {"analysis": canary.last_analysis, "window": {v: w.summary() for v, w in windows.items()}}
            if analysis.decision == "wait":
                if not waited:  # once per window, not every tick
                    self._event(canary, "wait", analysis.reason, numbers, "canary")
                    self._count(canary, "wait")
                continue
            if analysis.decision == "rollback":
                await self._rollback(canary, analysis.reason, numbers, "canary")
                continue
            await self._advance(canary, numbers)

    async def _advance(self, canary: Canary, numbers: dict[str, Any]) -> None:
        if canary.step + 1 >= len(canary.config.steps) or canary.config.steps[canary.step + 1] >= 100:
            await self._promote(canary, f"passed step {canary.step + 1} of {len(canary.config.steps)}", numbers,
                                "canary")  # fmt: skip
            return
        before = canary.config.steps[canary.step]
        canary.step += 1
        self._new_window(canary)
        self._event(canary, "step", f"no significant regression: {before}% -> {canary.config.steps[canary.step]}%",
                    numbers, "canary")  # fmt: skip
        self._count(canary, "step")

    async def _promote(self, canary: Canary, reason: str, numbers: dict[str, Any] | None, actor: str) -> None:
        try:
            self.store.promote(canary.alias, canary.candidate, force=canary.forced, reason=f"canary: {reason}",
                               actor=actor)  # fmt: skip
        except StoreError as exc:
            raise CanaryError(400, f"cannot promote: {exc}", "promote_refused") from exc
        old = self.store.get(canary.alias, canary.stable)
        self._finish(canary, "promoted")
        self._event(canary, "promote", reason, numbers, actor)
        self._count(canary, "promote")
        self.store.retire(canary.alias, old.version, reason=f"replaced by {canary.alias}@{canary.candidate}",
                          actor=actor)  # fmt: skip
        await self.registry.retire(old)  # unloaded once its in-flight requests finish

    async def _rollback(self, canary: Canary, reason: str, numbers: dict[str, Any] | None, actor: str) -> None:
        candidate = self.store.get(canary.alias, canary.candidate)
        self._finish(canary, "rolled_back")
        self._event(canary, "rollback", reason, numbers, actor)
        self._count(canary, "rollback")
        self.store.retire(canary.alias, candidate.version, reason=f"canary rolled back: {reason}", actor=actor)
        await self.registry.retire(candidate)
        log.warning("canary %s rolled back: %s", candidate.ref, reason)

    # -- manual -----------------------------------------------------------------------------------

    def _require_active(self, alias: str, *states: State) -> Canary:
        canary = self.active.get(alias)
        if canary is None:
            raise CanaryError(404, f"alias {alias!r} has no canary running", "no_canary")
        if states and canary.state not in states:
            raise CanaryError(409, f"the canary of {alias!r} is {canary.state}", "canary_state")
        return canary

    def pause(self, alias: str, reason: str = "", actor: str = "admin-api") -> Canary:
        canary = self._require_active(alias, "running")
        canary.state = "paused"
        self._save(canary)
        self._event(canary, "pause", reason or "paused: traffic stays at this weight, no decisions", None, actor)
        return canary

    def resume(self, alias: str, reason: str = "", actor: str = "admin-api") -> Canary:
        canary = self._require_active(alias, "paused")
        canary.state = "running"
        self._new_window(canary)
        self._event(canary, "resume", reason or "resumed: this step's window starts again", None, actor)
        return canary

    async def promote(self, alias: str, reason: str = "", actor: str = "admin-api") -> Canary:
        canary = self._require_active(alias)
        await self._promote(canary, reason or "promoted by hand", canary.last_analysis, actor)
        return canary

    async def rollback(self, alias: str, reason: str = "", actor: str = "admin-api") -> Canary:
        canary = self._require_active(alias)
        await self._rollback(canary, reason or "rolled back by hand", canary.last_analysis, actor)
        return canary

    def abort(self, alias: str, reason: str = "", actor: str = "admin-api") -> Canary:
        """Stop sending traffic to the candidate; it stays published (not retired)."""
        canary = self._require_active(alias)
        self._finish(canary, "aborted")
        self._event(canary, "abort", reason or "aborted by hand", canary.last_analysis, actor)
        self._count(canary, "abort")
        return canary

    async def run(self, poll_s: float = 1.0) -> None:
        """The analysis loop (the app's lifespan runs it)."""
        while True:
            try:
                await self.tick()
            except Exception:  # one failed analysis must not stop the loop
                log.exception("canary analysis failed")
            await asyncio.sleep(poll_s)

    # -- bookkeeping --------------------------------------------------------------------------------

    def _new_window(self, canary: Canary) -> None:
        canary.step_started_at = time.time()
        canary.last_analysis = None
        self.windows.pop(canary.id, None)
        self._save(canary)

    def _finish(self, canary: Canary, state: State) -> None:
        canary.state = state
        self.active.pop(canary.alias, None)
        self.windows.pop(canary.id, None)
        self._save(canary)

    def _save(self, canary: Canary) -> None:
        with self.db.begin() as db:
            db.execute(sa.update(canaries_table).where(canaries_table.c.id == canary.id).values(
                state=canary.state, step=canary.step, step_started_at=canary.step_started_at,
                last_analysis=json.dumps(canary.last_analysis) if canary.last_analysis else None))  # fmt: skip

    def _event(self, canary: Canary, action: str, reason: str, numbers: dict[str, Any] | None = None,
               actor: str = "canary") -> None:  # fmt: skip
        with self.db.begin() as db:
            db.execute(sa.insert(events_table).values(
                canary_id=canary.id, alias=canary.alias, at=time.time(), action=action, reason=reason,
                numbers=json.dumps(numbers) if numbers is not None else None, actor=actor))  # fmt: skip

    def _count(self, canary: Canary, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.canary_decisions.labels(canary.alias, outcome).inc()
