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
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import sqlalchemy as sa

from serving.outputs.modes import JSON_MODES, AliasPolicy
from serving.state.cache import ReadCache
from serving.state.changes import POLICIES, announce
from serving.state.db import ensure_schema
from serving.state.tables import policies_table


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
        """Replace the alias's policy; an all-empty policy removes the row."""
        if policy.json_mode is not None and policy.json_mode not in JSON_MODES:
            raise ValueError(f"json_mode {policy.json_mode!r}: use one of {', '.join(JSON_MODES)}")
        with self.engine.begin() as db:
            db.execute(sa.delete(policies_table).where(policies_table.c.alias == alias))
            if policy != AliasPolicy():
                schema = json.dumps(policy.default_schema) if policy.default_schema is not None else None
                row = {
                    "alias": alias,
                    "json_mode": policy.json_mode,
                    "default_schema": schema,
                    "updated_at": datetime.now(UTC),
                }
                db.execute(sa.insert(policies_table).values(**row))
            announce(db, POLICIES)  # the other gateways forget theirs when this commits
        self.changed()
        return policy

    def changed(self) -> None:
        """Forget the cached policies (after a write here, or one another gateway announced)."""
        self._known.changed()
