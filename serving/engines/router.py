"""Which engine serves a request: affinity with bounded load, as a pure function of a snapshot.

For a request to adapter ``a`` on base model ``B``: first, a healthy engine
serving ``a`` merged into its base (``lorafleet export --merge``: base-model
speed, no adapter slot), the least loaded if several. Otherwise the candidates
are the healthy engines serving ``B``. In order:

1. **Affinity.** An engine where ``a`` is resident, unless taking the request
   would put it above the bounded-load cap, ``ceil((1 + ε) × (total load + 1)
   / candidates)`` (consistent hashing with bounded loads, Mirrokni, Thorup and
   Zadimoghaddam 2018), or make its working set (the distinct adapters its
   requests need now) exceed its ``max_loras``. The least loaded such engine.
2. **A free slot.** An engine with room for one more resident adapter: ``a``
   is loaded there. A hot adapter therefore spreads to as many engines as its
   load needs, and a cold one stays where it is. Spreading never takes a slot
   another adapter needs: a second copy is loaded only while the free slots
   left are at least the adapters (of ``expected``) resident nowhere.
3. **An idle slot.** An engine holding an adapter no request needs now: that
   one is swapped out for ``a``, preferring one with a copy elsewhere (under the
   same reserve when ``a`` is spreading).
4. **Queue where it is.** If ``a`` is resident somewhere but every such engine
   is over the cap and nothing can be freed, the least loaded of them
   (spreading now would evict an adapter another request is using: thrashing).
5. **Least loaded.** Otherwise the least loaded candidate loads ``a``; its
   working set exceeds ``max_loras`` and vLLM makes the request wait for a slot.
   With the reserve above, this happens only when the adapters wanted at once
   outnumber the fleet's slots.

One engine degrades to the single-engine gateway: it is always chosen, and
loads ``a`` if it does not hold it. Ties go to the engine named first.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

Reason = Literal["base", "merged", "resident", "free_slot", "idle_slot", "queued_at_resident", "least_loaded"]


@dataclass(frozen=True)
class EngineView:
    """One engine as the router sees it (``serving.engines.load`` reads the numbers from vLLM)."""

    name: str
    base: str  # the base model it serves (its sha256, or its name)
    max_loras: int
    healthy: bool = True
    queued: int = 0  # requests running and waiting there
    resident: frozenset[str] = field(default_factory=frozenset)  # adapters loaded there
    working: frozenset[str] = field(default_factory=frozenset)  # adapters its requests need now
    merged: str | None = None  # the adapter it serves merged into its base model (its base is that merge)

    def working_with(self, adapter: str) -> int:
        return len(self.working | {adapter})


@dataclass(frozen=True)
class Route:
    engine: str
    load_adapter: bool  # the adapter must be loaded there first
    evict: str | None  # the idle adapter to unload to make room (rule 3)
    reason: Reason


def route(
    engines: Sequence[EngineView], adapter: str, base: str, epsilon: float = 0.25, expected: Collection[str] = ()
) -> Route | None:
    """The engine for one request to ``adapter`` on ``base``; ``None`` when no healthy engine serves ``base``.

    ``expected``: the adapters on ``base`` the gateway may route to (each alias's serving version and canary),
    for which spreading keeps slots free.
    """
    merged = [e for e in engines if e.healthy and e.merged == adapter]
    if merged:
        return Route(min(merged, key=lambda e: (e.queued, merged.index(e))).name, False, None, "merged")
    candidates = [e for e in engines if e.healthy and e.base == base]
    if not candidates:
        return None
    cap = max(1, math.ceil((1 + epsilon) * (sum(e.queued for e in candidates) + 1) / len(candidates)))

    def least(pool: list[EngineView]) -> EngineView:
        return min(pool, key=lambda e: (e.queued, candidates.index(e)))

    resident = [e for e in candidates if adapter in e.resident]
    affine = [e for e in resident if e.queued + 1 <= cap and e.working_with(adapter) <= e.max_loras]
    if affine:
        return Route(least(affine).name, False, None, "resident")
    copies = Counter(a for e in candidates for a in e.resident)
    homeless = len(set(expected) - set(copies) - {adapter})  # adapters that will need a slot of their own
    free_slots = sum(max(0, e.max_loras - len(e.resident)) for e in candidates)
    spreading = bool(resident)
    free = [e for e in candidates if adapter not in e.resident and len(e.resident) < e.max_loras]
    if free and (not spreading or free_slots - 1 >= homeless):
        return Route(least(free).name, True, None, "free_slot")
    swaps = []  # (engine, the idle adapter it would unload)
    for e in candidates:
        idle = sorted(e.resident - e.working, key=lambda a: (copies[a] == 1, a))  # duplicated ones first
        if adapter in e.resident or not idle:
            continue
        if spreading and copies[idle[0]] == 1 and free_slots < homeless + 1:
            continue  # it would make another adapter homeless, with no slot left for it
        swaps.append((e, idle[0]))
    if swaps:
        engine, victim = min(swaps, key=lambda s: (copies[s[1]] == 1, s[0].queued, candidates.index(s[0])))
        return Route(engine.name, True, victim, "idle_slot")
    if resident:
        return Route(least(resident).name, False, None, "queued_at_resident")
    return Route(least(candidates).name, True, None, "least_loaded")


def route_blind(engines: Sequence[EngineView], adapter: str, base: str, turn: int) -> Route | None:
    """A baseline to measure affinity against (``make bench-fleet``), not for service: the ``turn``-th candidate
    (round-robin's counter, or a random number) whatever it holds; the adapter is loaded there if missing, in a
    free slot, else in place of an idle one, else beyond ``max_loras`` (vLLM makes the request wait for a slot)."""
    candidates = [e for e in engines if e.healthy and e.base == base]
    if not candidates:
        return None
    chosen = candidates[turn % len(candidates)]
    if adapter in chosen.resident:
        return Route(chosen.name, False, None, "resident")
    if len(chosen.resident) < chosen.max_loras:
        return Route(chosen.name, True, None, "free_slot")
    idle = sorted(chosen.resident - chosen.working)
    if idle:
        return Route(chosen.name, True, idle[0], "idle_slot")
    return Route(chosen.name, True, None, "least_loaded")
