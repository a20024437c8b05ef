"""The canary decision loop and the manual operations: start, analyse each window, step, promote, roll back.

The manager keeps the running canaries and the samples of each step's window
in memory (``analysis.Window``), asks ``analysis.analyze`` for a decision every
``interval_s``, and records each decision through ``state.CanaryRecords``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from contract.store import AdapterStore, AdapterVersion, StoreConflict, StoreError, VersionNotFound
from serving.canary.analysis import CanaryConfig, Window, analyze, user_point
from serving.canary.state import ACTIVE, Canary, CanaryError, State, Variant
from serving.engines.adapters import AdapterRegistry
from serving.errors import ErrorCode
from serving.metrics import GatewayMetrics
from serving.records import RequestRecord
from serving.state.canaries import CanaryRecords
from serving.state.changes import CANARIES
from serving.state.leadership import Leadership

log = logging.getLogger("lorafleet.canary")

# A tenant's share of the canary arm, once it has sent SHARE_MIN requests in a window (see ``_share_cap``).
SHARE_SLACK = 0.05
SHARE_MIN = 20


def _share_cap(weight: float, n: int) -> float:
    """The most of ``n`` requests' share on an arm of ``weight`` that honest (uniform) users reach: the weight,
    plus four binomial standard deviations, plus ``SHARE_SLACK``."""
    return weight + SHARE_SLACK + 4 * math.sqrt(weight * (1 - weight) / n)


class CanaryManager:
    def __init__(
        self,
        records: CanaryRecords,
        leadership: Leadership,
        registry: AdapterRegistry,
        metrics: GatewayMetrics | None = None,
        warm: Callable[[AdapterVersion], Awaitable[object]] | None = None,
        announce: Callable[[str], None] = lambda _channel: None,
    ) -> None:
        self.records, self.registry, self.metrics = records, registry, metrics
        self.warm = warm  # loads a version where its requests will go (serving.engines.Fleet.warm)
        self.windows: dict[int, dict[str, Window]] = {}  # this gateway's samples of each canary's window
        self.shares: dict[int, dict[str, list[int]]] = {}  # canary id -> tenant -> [requests, on the canary]
        self.active: dict[str, Canary] = {}
        self._writes = asyncio.Lock()
        # Several gateways on PostgreSQL: each shares its samples, one (the leader) merges them and decides, every
        # one follows the canaries' state in the database.
        self.leadership = leadership
        self.shared = self.leadership.shared
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.merged: dict[int, dict[str, Window]] = {}  # every gateway's samples, as of the last analysis
        self._unshared: set[int] = set()  # canaries with samples not shared yet
        self._wake = asyncio.Event()
        self.announce = announce  # tells the other gateways (serving.state.changes.announcer)
        for canary in self.records.active():  # at start, before the gateway serves: written directly
            self.active[canary.alias] = canary
            if self.shared:
                continue  # the other gateways kept the window going: this one joins it
            canary.step_started_at = time.time()
            self.records.save(canary)
            self.records.event(canary, "resume_after_restart", "the gateway restarted: this step's window starts again")

    @property
    def store(self) -> AdapterStore:
        return self.registry.store

    # -- reads ------------------------------------------------------------------------------------

    def latest(self, alias: str) -> Canary:
        """The alias's active canary, else its most recent one."""
        canary = self.active.get(alias) or self.records.latest(alias)
        if canary is None:
            raise CanaryError(ErrorCode.NO_CANARY, f"alias {alias!r} has had no canary; start one first")
        return canary

    def status(self, alias: str) -> dict[str, Any]:
        canary = self.latest(alias)
        windows = self.merged.get(canary.id) or self.windows.get(canary.id, {})  # merged: the leader's, shared
        return canary.as_dict() | {
            "window": {v: windows.get(v, Window()).summary() for v in ("stable", "canary")},
            "window_age_s": round(time.time() - canary.step_started_at, 1) if canary.state in ACTIVE else None,
            "decided_here": self.leadership.holding,  # several gateways: whether this one analyses and decides
        }

    def events(self, alias: str) -> list[dict[str, Any]]:
        return self.records.events(alias)

    def weights(self) -> dict[str, float]:
        return {alias: canary.weight for alias, canary in self.active.items()}

    # -- serving ----------------------------------------------------------------------------------

    def assign(self, alias: str, user: str, tenant: str = "") -> tuple[Variant, AdapterVersion] | None:
        """The variant and version that serve ``user`` of ``tenant`` on ``alias``, or ``None`` with no canary.

        Sticky: a user's point decides its arm. Capped: within a step's window, once a tenant has sent
        ``SHARE_MIN`` requests, its share on the canary stays under ``_share_cap`` whatever user keys it sends,
        so no client can pile its requests into one arm (and steer the decision). Honest traffic, whose users'
        points are uniform, stays under the cap (4 standard deviations above the weight, plus a slack).
        """
        canary = self.active.get(alias)
        if canary is None:
            return None
        to_canary = user_point(canary.id, user) < canary.weight
        sent = self.shares.setdefault(canary.id, {}).setdefault(tenant, [0, 0])  # [requests, on the canary]
        if to_canary and sent[0] >= SHARE_MIN and (sent[1] + 1) / (sent[0] + 1) > _share_cap(canary.weight, sent[0]):
            to_canary = False
        sent[0] += 1
        sent[1] += to_canary
        # Both versions were checked when the canary started; no file is read per request.
        if to_canary:
            return "canary", AdapterVersion(alias, canary.candidate, self.store.root / alias / str(canary.candidate))
        return "stable", AdapterVersion(alias, canary.stable, self.store.root / alias / str(canary.stable))

    def observe(self, canary_id: int, variant: str, record: RequestRecord) -> None:
        if not any(c.id == canary_id for c in self.active.values()):
            return  # the canary ended while this request ran
        self.windows.setdefault(canary_id, {}).setdefault(variant, Window()).add(record)
        self._unshared.add(canary_id)

    # -- decisions --------------------------------------------------------------------------------

    async def start(
        self,
        alias: str,
        version: int,
        config: CanaryConfig,
        *,
        force: bool = False,
        reason: str = "",
        actor: str = "admin-api",
    ) -> Canary:
        if alias in self.active:
            other = self.active[alias]
            raise CanaryError(
                ErrorCode.CANARY_EXISTS,
                f"alias {alias!r} already has a canary ({alias}@{other.candidate}, "
                f"{other.state}); abort it or let it finish first",
            )
        if alias not in self.store.aliases():
            raise CanaryError(ErrorCode.ALIAS_NOT_FOUND, f"no alias {alias!r} in the adapter store")
        try:
            target = self.store.get(alias, version)
        except VersionNotFound as exc:
            raise CanaryError(ErrorCode.ADAPTER_NOT_FOUND, str(exc)) from exc
        stable = self.store.stable(alias)
        if stable is None:
            raise CanaryError(
                ErrorCode.NO_STABLE_VERSION, f"alias {alias!r} has no stable version to compare with; promote one first"
            )
        if stable.version == version:
            raise CanaryError(ErrorCode.ALREADY_STABLE, f"{target.ref} is already the stable version")
        if self.store.is_retired(target):
            raise CanaryError(ErrorCode.VERSION_RETIRED, f"{target.ref} is retired; publish it again to try it")
        refusal = self.store.gate_refusal(target)
        if refusal and not force:
            raise CanaryError(ErrorCode.GATE_REQUIRED, refusal)
        problems = self.registry.fit_problems(target.path)
        unserved = self.registry.unserved(target)
        if unserved:
            problems.append(unserved)
        if problems:
            raise CanaryError(ErrorCode.ADAPTER_REFUSED, f"{target.ref} cannot be served: " + "; ".join(problems))
        if self.warm is not None:
            await self.warm(target)  # loaded before its first request
        canary = await asyncio.to_thread(
            self.records.insert, alias, version, stable.version, config, bool(refusal and force)
        )
        self.active[alias] = canary
        self.announce(CANARIES)
        why = f"forced without a passing gate ({refusal})" if refusal and force else "gate passed"
        await self._event(
            canary, "start", f"{reason or 'canary started'}; {why}", {"config": config.model_dump()}, actor
        )
        log.info("canary %s@%d started at %d%% against %s@%d", alias, version, config.steps[0], alias, stable.version)
        return canary

    async def tick(self, now: float | None = None) -> None:
        """Analyse every running canary whose interval has passed (and keep analysing one that waits).

        Several gateways: first follow the database (canaries started, stepped or ended elsewhere) and share this
        gateway's samples; only the leader goes on to analyse, on every gateway's samples."""
        if self.shared:
            await self._follow()
            await self._share()
            if not await asyncio.to_thread(self.leadership.held):
                return
        now = time.time() if now is None else now
        for canary in list(self.active.values()):
            if canary.state != "running" or now - canary.step_started_at < canary.config.interval_s:
                continue
            try:
                await self._decide(canary)
            except CanaryError as exc:  # changed meanwhile (an admin, another gateway): followed, decided next time
                log.info("canary %s@%d: no decision this time: %s", canary.alias, canary.candidate, exc)

    async def _decide(self, canary: Canary) -> None:
        """Analyse one running canary's window and act on it: wait, step, promote or roll back."""
        windows = self.windows.get(canary.id, {})
        if self.shared:
            every = await asyncio.to_thread(self.records.shared, canary.id, canary.step_started_at)
            windows = self.merged[canary.id] = {v: Window.merged(texts) for v, texts in every.items()}
        analysis = analyze(windows.get("stable", Window()), windows.get("canary", Window()), canary.config)
        waited = (canary.last_analysis or {}).get("decision") == "wait"
        analysed = analysis.as_dict() | {"step": canary.step + 1}
        if analysed != canary.last_analysis:  # a canary waiting with no new samples writes nothing
            canary.last_analysis = analysed
            await self._save(canary, announce=False)  # the others read it at their next poll
        numbers = {"analysis": canary.last_analysis, "window": {v: w.summary() for v, w in windows.items()}}
        if analysis.decision == "wait":
            if not waited:  # once per window, not every tick
                await self._event(canary, "wait", analysis.reason, numbers, "canary")
                self._count(canary, "wait")
            return
        await self._check_current(canary, "running")  # still running, as the database has it, after the awaits
        if analysis.decision == "rollback":
            await self._rollback(canary, analysis.reason, numbers, "canary")
            return
        await self._advance(canary, numbers)

    async def _advance(self, canary: Canary, numbers: dict[str, Any]) -> None:
        if canary.step + 1 >= len(canary.config.steps) or canary.config.steps[canary.step + 1] >= 100:
            await self._promote(
                canary, f"passed step {canary.step + 1} of {len(canary.config.steps)}", numbers, "canary"
            )
            return
        before = canary.config.steps[canary.step]
        canary.step += 1
        await self._new_window(canary)
        after = canary.config.steps[canary.step]
        await self._event(canary, "step", f"no significant regression: {before}% -> {after}%", numbers, "canary")
        self._count(canary, "step")

    async def _promote(self, canary: Canary, reason: str, numbers: dict[str, Any] | None, actor: str) -> None:
        try:
            await asyncio.to_thread(
                self.store.promote,
                canary.alias,
                canary.candidate,
                force=canary.forced,
                reason=f"canary: {reason}",
                actor=actor,
                expected=canary.stable,
            )
        except StoreConflict as exc:
            # The deciding gateway that died promoted the candidate and did not live to record the end: its
            # decision stands (once), and this one finishes it. Anything else moved the alias: refused.
            stable = await asyncio.to_thread(self.store.stable, canary.alias)
            if stable is None or stable.version != canary.candidate:
                raise CanaryError(ErrorCode.ALIAS_CHANGED, f"cannot promote: {exc}") from exc
            reason = f"{reason} (the promotion was made by a gateway that stopped before recording it)"
        except StoreError as exc:
            raise CanaryError(ErrorCode.PROMOTE_REFUSED, f"cannot promote: {exc}") from exc
        self.registry.changed()
        old = self.store.get(canary.alias, canary.stable)
        await self._finish(canary, "promoted", decided=True)  # the store has moved: recorded as such
        await self._event(canary, "promote", reason, numbers, actor)
        self._count(canary, "promote")
        if not await asyncio.to_thread(self.store.is_retired, old):
            await asyncio.to_thread(
                self.store.retire,
                canary.alias,
                old.version,
                reason=f"replaced by {canary.alias}@{canary.candidate}",
                actor=actor,
            )
        self.registry.changed()
        await self.registry.retire(old)  # unloaded once its in-flight requests finish

    async def _rollback(self, canary: Canary, reason: str, numbers: dict[str, Any] | None, actor: str) -> None:
        candidate = self.store.get(canary.alias, canary.candidate)
        await self._finish(canary, "rolled_back")
        await self._event(canary, "rollback", reason, numbers, actor)
        self._count(canary, "rollback")
        await asyncio.to_thread(
            self.store.retire, canary.alias, candidate.version, reason=f"canary rolled back: {reason}", actor=actor
        )
        self.registry.changed()
        await self.registry.retire(candidate)
        log.warning("canary %s rolled back: %s", candidate.ref, reason)

    # -- manual -----------------------------------------------------------------------------------

    def _require_active(self, alias: str, *states: State) -> Canary:
        canary = self.active.get(alias)
        if canary is None:
            raise CanaryError(ErrorCode.NO_CANARY, f"alias {alias!r} has no canary running")
        if states and canary.state not in states:
            raise CanaryError(ErrorCode.CANARY_STATE, f"the canary of {alias!r} is {canary.state}")
        return canary

    async def pause(self, alias: str, reason: str = "", actor: str = "admin-api") -> Canary:
        canary = self._require_active(alias, "running")
        canary.state = "paused"
        await self._save(canary)
        await self._event(canary, "pause", reason or "paused: traffic stays at this weight, no decisions", None, actor)
        return canary

    async def resume(self, alias: str, reason: str = "", actor: str = "admin-api") -> Canary:
        canary = self._require_active(alias, "paused")
        canary.state = "running"
        await self._new_window(canary)
        await self._event(canary, "resume", reason or "resumed: this step's window starts again", None, actor)
        return canary

    async def promote(self, alias: str, reason: str = "", actor: str = "admin-api") -> Canary:
        canary = self._require_active(alias)
        await self._check_current(canary, *ACTIVE)
        await self._promote(canary, reason or "promoted by hand", canary.last_analysis, actor)
        return canary

    async def rollback(self, alias: str, reason: str = "", actor: str = "admin-api") -> Canary:
        canary = self._require_active(alias)
        await self._check_current(canary, *ACTIVE)
        await self._rollback(canary, reason or "rolled back by hand", canary.last_analysis, actor)
        return canary

    async def abort(self, alias: str, reason: str = "", actor: str = "admin-api") -> Canary:
        """Stop sending traffic to the candidate; it stays published (not retired)."""
        canary = self._require_active(alias)
        await self._finish(canary, "aborted")
        await self._event(canary, "abort", reason or "aborted by hand", canary.last_analysis, actor)
        self._count(canary, "abort")
        return canary

    async def run(self, poll_s: float = 1.0) -> None:
        """The analysis loop (the app's lifespan runs it); ``wake`` runs it at once."""
        try:
            while True:
                try:
                    await self.tick()
                except Exception:  # one failed analysis must not stop the loop
                    log.exception("canary analysis failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), poll_s)
                self._wake.clear()
        finally:
            await asyncio.to_thread(self.leadership.release)

    def wake(self) -> None:
        """Another gateway changed a canary (``serving.state.changes``): follow it now rather than at the next poll."""
        self._wake.set()

    # -- several gateways ---------------------------------------------------------------------------

    async def _follow(self) -> None:
        """Take the canaries' state from the database: what the leader (or an admin call on another gateway)
        decided. A new window drops this gateway's samples of the old one; an ended canary, all of them."""
        now_active = {c.alias: c for c in await asyncio.to_thread(self.records.active)}
        ended = False
        for alias, mine in list(self.active.items()):
            theirs = now_active.get(alias)
            if theirs is None or theirs.id != mine.id:
                ended = True
                self._drop_samples(mine.id)
            elif theirs.step_started_at != mine.step_started_at:
                self._drop_samples(mine.id)
        self.active = now_active
        if ended:
            self.registry.forget()  # a promotion or a rollback moved what the alias serves

    async def _share(self) -> None:
        for canary in list(self.active.values()):
            if canary.id not in self._unshared:
                continue
            self._unshared.discard(canary.id)
            windows = {variant: w.to_json() for variant, w in self.windows.get(canary.id, {}).items()}
            await asyncio.to_thread(self.records.share, canary.id, canary.step_started_at, self.replica, windows)

    # -- bookkeeping --------------------------------------------------------------------------------

    async def _new_window(self, canary: Canary) -> None:
        canary.step_started_at = time.time()
        canary.last_analysis = None
        self._drop_samples(canary.id)
        await self._save(canary)

    async def _finish(self, canary: Canary, state: State, *, decided: bool = False) -> None:
        """End the canary. ``decided``: the store has already moved (a promotion made, a candidate retired), so the
        end is recorded whatever another gateway wrote meanwhile; the record must say what the store did."""
        canary.state = state
        self.active.pop(canary.alias, None)
        self._drop_samples(canary.id)
        if decided:
            canary.seen = None  # an unconditional write
        await self._save(canary)

    def _drop_samples(self, canary_id: int) -> None:
        """Forget what this gateway counted of a canary's window: its samples, the tenants' shares, the merge."""
        self.windows.pop(canary_id, None)
        self.shares.pop(canary_id, None)
        self.merged.pop(canary_id, None)

    # The database writes run in a worker thread (the event loop relays every stream meanwhile), one at a time
    # and in order, each on a copy of the canary as it was when the write was asked for.

    async def _save(self, canary: Canary, announce: bool = True) -> None:
        """Write the canary as it is now, if the database still has it as this gateway last saw it; else follow
        the database's and refuse (``CanaryError`` 409): another gateway paused, aborted or stepped it first."""
        async with self._writes:
            written = copy.copy(canary)
            saved = await asyncio.to_thread(self.records.save, written)
        if not saved:
            await self._check_current(canary)  # raises, having followed the database
            raise CanaryError(ErrorCode.CANARY_STATE, f"the canary of {canary.alias!r} changed meanwhile")
        canary.seen = written.seen
        if announce:  # a new state, step or window: the other gateways follow at once
            self.announce(CANARIES)

    async def _check_current(self, canary: Canary, *states: State) -> None:
        """Refuse (``CanaryError`` 409) to act on ``canary`` unless it is still this alias's canary, in one of
        ``states`` (any, when none are named), with the state and step the database has; a canary the database
        has otherwise is followed first."""
        mine = self.active.get(canary.alias) is canary and (not states or canary.state in states)
        fresh = await asyncio.to_thread(self.records.get, canary.id)
        if mine and (fresh.state, fresh.step) == canary.seen:
            return
        if (fresh.state, fresh.step) != canary.seen:
            current = self.active.get(fresh.alias)
            if current is not None and current.id != fresh.id:
                pass  # the alias has a newer canary already: this one is history
            elif fresh.state in ACTIVE:
                if current is None or current.step_started_at != fresh.step_started_at:
                    self._drop_samples(fresh.id)  # samples of another window than the database's
                self.active[fresh.alias] = fresh
            else:
                self.active.pop(fresh.alias, None)
                self._drop_samples(fresh.id)
                self.registry.forget()
        raise CanaryError(
            ErrorCode.CANARY_STATE,
            f"the canary of {canary.alias!r} changed meanwhile (now {fresh.state}, step {fresh.step + 1}); "
            "read it again",
        )

    async def _event(
        self, canary: Canary, action: str, reason: str, numbers: dict[str, Any] | None = None, actor: str = "canary"
    ) -> None:
        async with self._writes:
            await asyncio.to_thread(self.records.event, copy.copy(canary), action, reason, numbers, actor)

    def _count(self, canary: Canary, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.canary_decisions.labels(canary.alias, outcome).inc()
