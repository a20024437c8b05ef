"""Fine-tuning jobs' rollouts, followed by every gateway: the gated version's canary started, its steps and its
verdict copied into the job, so the job's events tell the whole way from data to production.

A job into an alias ends (in its executor, ``finetune.runner``) with its
version published and gated (``serving.state.rollouts`` has the states). What
is left needs a gateway, since canaries are decided where the traffic is:

- ``canary_pending``, the alias has no stable version (the gate was against
  the base model): promote the version at once;
- ``canary_pending`` otherwise: start a canary with the job's choice within the
  alias's rollout policy (``RolloutPolicy.choose``), if the stable version is
  still the one the gate compared with;
- ``canary``: copy the canary's new events (steps, waits, restarts) into the
  job's, and its end (promoted, rolled back, aborted) into the rollout.

Every write is conditional on the rollout as read (``RolloutRecords.advance``):
several gateways following the same job record each step once. Nothing here is
kept in memory between rounds, so a restart loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from contract.store import StoreConflict, StoreError
from serving.canary.manager import CanaryManager
from serving.canary.state import ACTIVE, Canary, CanaryError
from serving.state.jobs import Job
from serving.state.policies import AliasPolicies, CanaryChoice
from serving.state.rollouts import Event, RolloutRecords

log = logging.getLogger("lorafleet.rollouts")

VERDICTS = {"promoted": "promoted", "rolled_back": "rolled_back", "aborted": "aborted"}


class Rollouts:
    def __init__(self, records: RolloutRecords, canaries: CanaryManager, policies: AliasPolicies) -> None:
        self.records, self.canaries, self.policies = records, canaries, policies

    async def tick(self) -> None:
        """One round over the open rollouts (``serving.gateway`` calls it every second)."""
        for job in await asyncio.to_thread(self.records.open):
            try:
                if job.rollout_state == "canary_pending":
                    await self._start(job)
                else:
                    await self._follow(job)
            except Exception:  # one rollout's trouble must not hold up the others; the next round tries again
                log.warning("rollout of job %s: this round failed", job.id, exc_info=True)

    # -- canary_pending ------------------------------------------------------------------------------

    async def _start(self, job: Job) -> None:
        rollout = dict(job.rollout or {})
        alias, version = str(rollout["alias"]), int(rollout["version"])
        store = self.canaries.store
        ours = await asyncio.to_thread(self._canary_of, job, alias, version)
        if ours is not None:  # started already (by another gateway, or by this one before a crash): follow it
            await self._started(job, rollout, ours, ours.config)
            return
        stable = await asyncio.to_thread(store.stable, alias)
        if stable is not None and stable.version == version:  # promoted already, its record lost: record it
            message = f"Promoted: {alias}@{version} serves {alias} (promoted before this was recorded)."
            await self._advance(job, rollout | {"state": "promoted", "reason": "promoted"}, [(message, None, "info")])
            return
        if not await asyncio.to_thread(self.records.alone, job, alias):
            await self._not_started(job, f"{alias} is no longer granted to this tenant alone")
            return
        gated_against = rollout["stable"]
        if (stable.version if stable else None) != gated_against:
            now = f"{stable.ref}" if stable else "none"
            before = f"{alias}@{gated_against}" if gated_against else "the base model"
            await self._not_started(job, f"the alias's stable version changed since the gate ({before}; now {now})")
            return
        if stable is None:
            await self._promote_first(job, alias, version)
            return
        policy = await asyncio.to_thread(self.policies.rollout, alias)
        try:
            config = policy.choose(CanaryChoice.model_validate(job.options.get("rollout") or {}))
        except ValueError as exc:
            await self._not_started(job, f"lorafleet.rollout is outside the alias's rollout policy now: {exc}")
            return
        try:
            canary = await self.canaries.start(
                alias, version, config, reason=f"job {job.id}: its gate passed", actor=f"job:{job.id}"
            )
        except CanaryError as exc:
            latest = await asyncio.to_thread(self.canaries.records.latest, alias)
            if latest is not None and latest.state in ACTIVE and latest.candidate != version:
                return  # another version's canary runs on the alias: this one waits for it to end
            ours = await asyncio.to_thread(self._canary_of, job, alias, version)
            if ours is None:
                await self._not_started(job, exc.message)
                return
            canary = ours  # another gateway following this job started it first
        await self._started(job, rollout, canary, config)

    def _canary_of(self, job: Job, alias: str, version: int) -> Canary | None:
        """The canary of this job's version, if one was started since the job ended (whatever its state now)."""
        latest = self.canaries.records.latest(alias)
        if latest is None or latest.candidate != version or latest.created_at < (job.finished_at or 0) - 1:
            return None
        return latest

    async def _started(self, job: Job, rollout: dict[str, Any], canary: Canary, config: Any) -> None:
        steps = ", ".join(f"{s}%" for s in config.steps)
        message = (
            f"Canary started: {canary.alias}@{canary.candidate} takes {config.steps[0]}% of {canary.alias}'s "
            f"traffic (steps {steps}; decided every {config.interval_s:g} s on at least {config.min_samples} "
            "requests per version)."
        )
        rollout |= {"state": "canary", "canary": _canary_view(canary, event=0), "config": config.model_dump()}
        await self._advance(job, rollout, [(message, {"config": config.model_dump()}, "info")])

    async def _promote_first(self, job: Job, alias: str, version: int) -> None:
        """An alias with no stable version: its first gated version becomes stable at once."""
        store = self.canaries.store
        target = await asyncio.to_thread(store.get, alias, version)
        if await asyncio.to_thread(store.is_retired, target):
            await self._not_started(job, f"{target.ref} was retired meanwhile")
            return
        reason = f"job {job.id}: the gate passed against the base model (the alias had no stable version)"
        try:
            await asyncio.to_thread(store.promote, alias, version, reason=reason, actor=f"job:{job.id}", expected=None)
        except StoreConflict:  # another gateway following this job promoted it first, or the alias moved
            stable = await asyncio.to_thread(store.stable, alias)
            if stable is None or stable.version != version:
                moved = f"{alias} got a stable version meanwhile; {alias}@{version} was not promoted"
                await self._not_started(job, moved)
                return
        except StoreError as exc:
            await self._not_started(job, str(exc))
            return
        self.canaries.registry.changed()
        why = "its first version, gated against the base model"
        rollout = dict(job.rollout or {}) | {"state": "promoted", "reason": why}
        message = f"Promoted: {alias}@{version} now serves {alias} (its first stable version)."
        await self._advance(job, rollout, [(message, None, "info")])

    async def _advance(self, job: Job, rollout: dict[str, Any], events: list[Event]) -> None:
        if not await asyncio.to_thread(self.records.advance, job, rollout, events):
            log.info("rollout of job %s: another gateway recorded this step first", job.id)

    async def _not_started(self, job: Job, reason: str) -> None:
        rollout = dict(job.rollout or {}) | {"state": "not_started", "reason": reason}
        ref = f"{rollout['alias']}@{rollout['version']}"
        message = f"No canary for {ref}: {reason}. It stays published; it serves only if promoted by hand."
        await self._advance(job, rollout, [(message, None, "warn")])

    # -- canary ----------------------------------------------------------------------------------------

    async def _follow(self, job: Job) -> None:
        rollout = dict(job.rollout or {})
        seen = dict(rollout["canary"])
        records = self.canaries.records
        events = await asyncio.to_thread(records.events_of, seen["id"], seen["event"])
        found = await asyncio.to_thread(records.find, seen["id"])
        if found is None:  # its record is gone (a database restored from before it): nothing more will happen
            await self._advance(job, rollout | {"state": "aborted", "reason": "the canary's record is gone"}, [])
            return
        canary = found
        now = _canary_view(canary, event=events[-1]["id"] if events else seen["event"])
        if now == seen:
            return
        lines: list[Event] = [_event_line(e) for e in events if e["action"] != "start"]
        rollout["canary"] = now
        if canary.state not in ACTIVE:
            rollout["state"] = VERDICTS[canary.state]
            ended = next((e for e in reversed(events) if e["action"] in ("promote", "rollback", "abort")), None)
            rollout["reason"] = ended["reason"] if ended else canary.state
            lines.append(_verdict_line(rollout, canary))
        await self._advance(job, rollout, lines)


def _canary_view(canary: Canary, event: int) -> dict[str, Any]:
    """What the job shows of its canary: where it stands, and the last of its events copied (``event``)."""
    return {
        "id": canary.id,
        "state": canary.state,
        "step": canary.step + 1,
        "steps": canary.config.steps,
        "weight": canary.weight,
        "last_analysis": canary.last_analysis,
        "event": event,
    }


def _event_line(event: dict[str, Any]) -> Event:
    level = "warn" if event["action"] in ("rollback", "abort") else "info"
    data = {"canary_action": event["action"], "at": event["at"], "numbers": event["numbers"]}
    return f"Canary {event['action']}: {event['reason']}", data, level


def _verdict_line(rollout: dict[str, Any], canary: Canary) -> Event:
    ref = f"{canary.alias}@{canary.candidate}"
    if canary.state == "promoted":
        return f"Rollout ended: {ref} promoted; it now serves {canary.alias}.", None, "info"
    what = "rolled back" if canary.state == "rolled_back" else "aborted"
    stays = f"{canary.alias}@{canary.stable} keeps serving {canary.alias}"
    return f"Rollout ended: {ref} {what} ({rollout['reason']}); {stays}.", None, "warn"
