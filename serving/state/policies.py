"""Per-alias JSON policy, set by the admin: the JSON mode and a default schema, in the state database.

The modes themselves are in ``serving.outputs.modes``. Which schema and which mode a request gets (first that applies):

- schema: the request's ``response_format``; the chosen function's call schema
  when it sends ``tools``; the alias's default schema set here; the adapter
  manifest's ``output_schema``.
- mode: the request's own (``"lorafleet": {"json_mode": ...}`` in the body);
  the alias's mode set here; else ``enforce`` for a schema the request sent
  (what an OpenAI client means by ``response_format``) and ``validate`` for
  the alias's own schema.

Every request reads its alias's policy, so the gateway keeps them in memory
for ``cache_s`` seconds; ``set`` clears that at once, a change another process
writes shows within ``cache_s``.

An alias's **rollout policy** (``RolloutPolicy``, in the same row) says how a
fine-tuning job's new version of it reaches production: the gate's thresholds
(``lorafleet eval --gate``'s) and the canary it starts with. A tenant may
choose its own canary within it (``RolloutPolicy.choose``): never more users
on any step, no step skipped, never a shorter interval nor fewer samples.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.canary.analysis import CanaryConfig
from serving.outputs.modes import JSON_MODES, AliasPolicy
from serving.state.cache import ReadCache
from serving.state.changes import POLICIES, announce
from serving.state.db import ensure_schema
from serving.state.tables import policies_table


class GateThresholds(BaseModel):
    """The evaluation gate's thresholds (``evaluation.gate.Thresholds``, field for field)."""

    model_config = ConfigDict(extra="forbid")

    min_valid: float = Field(default=0.95, ge=0, le=1, description="Least schema-valid rate.")
    min_field_accuracy: float = Field(default=0.90, ge=0, le=1, description="Least mean field accuracy.")
    max_drop: float = Field(default=0.02, ge=0, le=1, description="Largest tolerated drop against stable.")
    alpha: float = Field(default=0.05, gt=0, lt=0.5, description="A drop counts when significant at this level.")


class CanaryChoice(BaseModel):
    """What a tenant may choose of its job's canary (``lorafleet.rollout``); the rest is the alias's policy."""

    model_config = ConfigDict(extra="forbid")

    steps: list[int] | None = Field(default=None, min_length=1, max_length=20, description="Rising weights in %.")
    interval_s: float | None = Field(default=None, ge=0.5, le=86_400, description="Analysis interval per step.")
    min_samples: int | None = Field(default=None, ge=1, le=1_000_000, description="Requests per variant to judge.")


class RolloutPolicy(BaseModel):
    """How a job's new version of an alias reaches production: the gate, then this canary."""

    model_config = ConfigDict(extra="forbid")

    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    gate: GateThresholds = Field(default_factory=GateThresholds)

    def choose(self, asked: CanaryChoice | None) -> CanaryConfig:
        """The canary a tenant's choice makes, within this policy; ``ValueError`` naming the field otherwise.

        Within means at least as cautious, step by step: as many steps or more, each at most the policy's weight at
        the same place (so no step is skipped), an interval as long or longer, as many samples or more."""
        if asked is None:
            return self.canary
        floor = self.canary
        if asked.steps is not None:
            if len(asked.steps) < len(floor.steps):
                raise ValueError(
                    f"steps: {len(asked.steps)} steps, fewer than the alias's {len(floor.steps)} "
                    f"({floor.steps}; its rollout policy)"
                )
            over = [(i, a, p) for i, (a, p) in enumerate(zip(asked.steps, floor.steps, strict=False)) if a > p]
            if over:
                i, a, p = over[0]
                raise ValueError(f"steps: step {i + 1} is {a}%, over the alias's {p}% there ({floor.steps})")
        if asked.interval_s is not None and asked.interval_s < floor.interval_s:
            raise ValueError(f"interval_s: {asked.interval_s} is under the alias's {floor.interval_s} s")
        if asked.min_samples is not None and asked.min_samples < floor.min_samples:
            raise ValueError(f"min_samples: {asked.min_samples} is under the alias's {floor.min_samples}")
        try:
            return CanaryConfig.model_validate(floor.model_dump() | asked.model_dump(exclude_none=True))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{field}: {first['msg'].removeprefix('Value error, ')}") from exc


class AliasPolicies:
    def __init__(self, engine: sa.Engine, cache_s: float = 0.0, outage_s: float = 0.0) -> None:
        self.engine = engine
        ensure_schema(engine)
        self._known: ReadCache[AliasPolicy] = ReadCache(cache_s, outage_s=outage_s)

    async def aget(self, alias: str) -> AliasPolicy:
        """``get`` for a request: never waiting on the database (``ReadCache.aget``)."""
        return await self._known.aget(alias, lambda: self._read(alias))

    def get(self, alias: str) -> AliasPolicy:
        if (known := self._known.get(alias)) is not None:
            return known
        generation = self._known.generation
        policy = self._read(alias)
        self._known.put(alias, policy, generation)
        return policy

    def _read(self, alias: str) -> AliasPolicy:
        with self.engine.connect() as db:
            row = db.execute(sa.select(policies_table).where(policies_table.c.alias == alias)).first()
        if row is None:
            return AliasPolicy()
        return AliasPolicy(row.json_mode, json.loads(row.default_schema) if row.default_schema else None)

    def set(self, alias: str, policy: AliasPolicy) -> AliasPolicy:
        """Replace the alias's JSON policy (its rollout policy stays); an all-empty policy restores the defaults."""
        if policy.json_mode is not None and policy.json_mode not in JSON_MODES:
            raise ValueError(f"json_mode {policy.json_mode!r}: use one of {', '.join(JSON_MODES)}")
        schema = json.dumps(policy.default_schema) if policy.default_schema is not None else None
        self._write(alias, {"json_mode": policy.json_mode, "default_schema": schema})
        return policy

    def rollout(self, alias: str) -> RolloutPolicy:
        """The alias's rollout policy (the defaults when none was set). Read when a job is created and run, never
        per request: not cached."""
        with self.engine.connect() as db:
            raw = db.execute(sa.select(policies_table.c.rollout).where(policies_table.c.alias == alias)).scalar()
        return RolloutPolicy.model_validate_json(raw) if raw else RolloutPolicy()

    def set_rollout(self, alias: str, policy: RolloutPolicy | None) -> RolloutPolicy:
        """Replace the alias's rollout policy (``None``: back to the defaults); its JSON policy stays."""
        self._write(alias, {"rollout": policy.model_dump_json() if policy is not None else None})
        return policy or RolloutPolicy()

    def _write(self, alias: str, values: dict[str, Any]) -> None:
        """Write some of the alias's row, keeping the rest; a row left all empty is removed."""
        with self.engine.begin() as db:
            row = db.execute(sa.select(policies_table).where(policies_table.c.alias == alias)).first()
            kept = {k: getattr(row, k) for k in ("json_mode", "default_schema", "rollout")} if row else {}
            merged = {"json_mode": None, "default_schema": None, "rollout": None} | kept | values
            db.execute(sa.delete(policies_table).where(policies_table.c.alias == alias))
            if any(v is not None for v in merged.values()):
                db.execute(sa.insert(policies_table).values(alias=alias, updated_at=datetime.now(UTC), **merged))
            announce(db, POLICIES)  # the other gateways forget theirs when this commits
        self.changed()

    def changed(self) -> None:
        """Forget the cached policies (after a write here, or one another gateway announced)."""
        self._known.changed()
