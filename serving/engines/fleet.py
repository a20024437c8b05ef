"""The engines behind one gateway, as one: health, load, and the choice of engine per request.

Each engine is a ``serving.engines.protocol.Engine`` (supervised child or external
server) watching its own ``/health``. With more than one, a poller reads each
healthy engine's ``/metrics`` every ``engine_poll_s`` (``serving.engines.load``);
an engine whose request fails to connect is marked down at once and left out of
routing until its health check passes again; after an engine (re)starts, the
adapters it holds are read back from its ``/v1/models`` (vLLM forgets
runtime-loaded ones). ``pick`` asks ``serving.engines.router`` for the engine of a
request, from a snapshot of all that and of what the gateway itself has in
flight (exact between polls); ``place`` also loads the adapter there.

Engines may serve different base models (``serving.engines.bases``): an adapter
goes only to engines serving the base it was trained on, and first to an
engine serving it merged, if one is bound to its version.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from contract.manifest import AdapterManifest
from contract.store import AdapterVersion, StoreError
from serving.engines.adapters import AdapterMisfit, AdapterRegistry
from serving.engines.bases import ServedBase, merged_problem
from serving.engines.load import EngineLoad, parse_load
from serving.engines.protocol import BASE_MODEL_NAME, Engine, EngineError
from serving.engines.router import EngineView, Reason, Route, route, route_blind

log = logging.getLogger("lorafleet.fleet")


class NoEngine(Exception):
    """No engine can take the request now: ``unserved`` when none serves the adapter's base model at all."""

    def __init__(self, message: str, unserved: bool = False) -> None:
        super().__init__(message)
        self.unserved = unserved


@dataclass
class Placement:
    """Where a request to an adapter version runs: the engine, the model name it has there, its lease."""

    engine: str
    engine_model: str  # the version's ref, or "base" on an engine serving it merged
    manifest: AdapterManifest
    release: Callable[[], None]  # ends the request's count on the version there (idempotent)
    reason: Reason


def _nothing() -> None:
    return None


class Fleet:
    """Several engines answering as one ``Engine`` for readiness, restarts and metrics; ``pick`` routes."""

    def __init__(
        self,
        engines: dict[str, Engine],
        registry: AdapterRegistry,
        max_loras: dict[str, int],
        epsilon: float = 0.25,
        poll_s: float = 1.0,
        dynamic: bool = False,
        merged: dict[str, str] | None = None,
        policy: str = "affinity",
    ) -> None:
        self.members, self.registry, self.max_loras = dict(engines), registry, dict(max_loras)
        self.policy = policy  # "affinity"; "round_robin" and "random" are baselines (make bench-fleet)
        self._turns = itertools.count()
        self._random = random.Random(0)
        self.merged = dict(merged or {})  # engine -> the adapter version ("orders@3") it serves merged
        self.epsilon, self.poll_s = epsilon, poll_s
        self.dynamic = dynamic  # engines come and go (DNS discovery)
        self._on_ready: Callable[[str], Awaitable[None]] | None = None
        self.loads: dict[str, EngineLoad] = {name: EngineLoad() for name in engines}
        self.down: set[str] = set()  # failed a request: out of routing until its health check passes again
        self.refused: dict[str, str] = {}  # serves another base model than the gateway's: never routed, and why
        self._poller: asyncio.Task[None] | None = None

    # -- as one engine ------------------------------------------------------------------------------------

    @property
    def restarts(self) -> int:
        return sum(e.restarts for e in self.members.values())

    def is_ready(self) -> bool:
        return any(self.healthy(name) for name in self.members)

    def healthy(self, name: str) -> bool:
        engine = self.members.get(name)
        return engine is not None and engine.is_ready() and name not in self.down and name not in self.refused

    async def check_base(self, name: str) -> bool:
        """Whether engine ``name`` serves the base model it should (vLLM exposes where it loaded it from, not a
        checksum: the directory's or the hub id's last part is compared), and, for a merged engine, whether that
        model is its adapter version merged. Refused, with the reason, otherwise."""
        base = self.registry.base_of(name)
        try:
            root = await self.members[name].base_root()
        except EngineError as exc:
            log.warning("engine %s: cannot read its models: %s", name, exc)
            return False
        if root is None:
            self.refused[name] = "it serves no model named 'base' (start it with --served-model-name base)"
        elif root.rstrip("/").rsplit("/", 1)[-1] != base.dir_name:
            self.refused[name] = f"it serves {root!r}, not the base model {base.dir_name!r} it is configured with"
        elif name in self.merged and (problem := await asyncio.to_thread(self._merge_problem, name, base)):
            self.refused[name] = f"it cannot serve {self.merged[name]} merged: {problem}"
        else:
            self.refused.pop(name, None)
            return True
        log.error("engine %s refused: %s", name, self.refused[name])
        return False

    def _merge_problem(self, name: str, base: ServedBase) -> str | None:
        alias, _, number = self.merged[name].partition("@")
        try:
            version = self.registry.store.get(alias, int(number))
        except (StoreError, ValueError) as exc:
            return f"{self.merged[name]} is not in the adapter store ({exc})"
        return merged_problem(base, version)

    @property
    def several(self) -> bool:
        """More than one engine, now or to come: routing, polling and lazy loading apply."""
        return len(self.members) > 1 or self.dynamic

    async def start(self, on_ready: Callable[[str], Awaitable[None]]) -> None:
        self._on_ready = on_ready
        for name, engine in self.members.items():
            await engine.start(_bound(on_ready, name))
        if self.several:
            self._poller = asyncio.create_task(self._poll(), name="fleet-poller")

    async def add(
        self, name: str, engine: Engine, max_loras: int, base: ServedBase | None = None, merged: str | None = None
    ) -> None:
        """A new engine (found by discovery): watched from now on, in routing once healthy."""
        log.info("engine %s added", name)
        self.members[name], self.max_loras[name], self.loads[name] = engine, max_loras, EngineLoad()
        if merged is not None:
            self.merged[name] = merged
        self.registry.add_engine(name, engine, base)
        assert self._on_ready is not None, "add() before start()"
        await engine.start(_bound(self._on_ready, name))

    async def remove(self, name: str, grace_s: float = 60.0) -> None:
        """An engine gone from discovery: out of routing at once, stopped once its requests had time to end."""
        engine = self.members.pop(name, None)
        if engine is None:
            return
        log.info("engine %s removed", name)
        self.registry.remove_engine(name)
        if self.registry.metrics is not None:
            self.registry.metrics.forget_engine(name)
        self.max_loras.pop(name, None)
        self.loads.pop(name, None)
        self.refused.pop(name, None)
        self.merged.pop(name, None)
        self.down.discard(name)

        async def stop_later() -> None:
            await asyncio.sleep(grace_s)
            await engine.stop()

        asyncio.get_running_loop().create_task(stop_later())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await asyncio.gather(*(engine.stop() for engine in self.members.values()))

    async def metrics(self) -> bytes:
        """The first engine's own exposition (a fleet's engines are best scraped one by one: docs/operations.md)."""
        return await next(iter(self.members.values())).metrics()

    async def adapters(self) -> list[str]:
        held: set[str] = set()
        for engine in self.members.values():
            if engine.is_ready():
                held |= set(await engine.adapters())
        return sorted(held)

    def describe(self) -> list[dict[str, object]]:
        """Each engine: where, health, load (vLLM's own figures) and the adapters it holds (admin, CLI)."""
        out = []
        for name, engine in self.members.items():
            side, load = self.registry.on(name), self.loads[name]
            base = self.registry.base_of(name)
            out.append(
                {
                    "name": name,
                    "url": getattr(engine, "url", None),
                    "healthy": self.healthy(name),
                    "base": base.record.name,
                    "base_sha256": base.record.sha256,
                    "merged": self.merged.get(name),
                    "marked_down": name in self.down,
                    "refused": self.refused.get(name),
                    "restarts": engine.restarts,
                    "max_loras": self.max_loras[name],
                    "running": load.running,
                    "waiting": load.waiting,
                    "kv_cache_usage": load.kv_cache_usage,
                    "in_flight": side.busy(),
                    "adapters": sorted(side.loaded),
                    "working_set": sorted(load.working_set),
                }
            )
        return out

    # -- routing ------------------------------------------------------------------------------------------

    def up(self, name: str) -> None:
        """The engine became healthy (its supervisor says so): back in routing."""
        self.down.discard(name)

    def mark_down(self, name: str) -> None:
        """A request to it failed to connect: out of routing until its health check passes again."""
        if name not in self.down and self.several:
            log.warning("engine %s failed a request: routing around it", name)
            self.down.add(name)

    def views(self) -> list[EngineView]:
        views = []
        for name in self.members:
            side = self.registry.on(name)
            load = self.loads[name]
            busy = {ref for ref, n in side.in_flight.items() if n > 0}
            views.append(
                EngineView(
                    name,
                    self.registry.base_of(name).key,
                    self.max_loras[name],
                    healthy=self.healthy(name),
                    queued=max(load.queued, side.busy()),
                    resident=frozenset(side.loaded) | frozenset(side.loading),
                    working=frozenset(busy | (load.working_set & set(side.loaded))),
                    merged=self.merged.get(name),
                )
            )
        return views

    def pick(
        self,
        adapter: str | None,
        base: str | None = None,
        exclude: Collection[str] = (),
        expected: Collection[str] = (),
    ) -> Route | None:
        """The engine for a request to ``adapter`` on the base model keyed ``base`` (``ServedBase.key``), not one
        of ``exclude``; ``adapter`` None: the bare base model (the gateway's own)."""
        views = [v for v in self.views() if v.name not in exclude]
        if adapter is None:
            healthy = [v for v in views if v.healthy and v.base == self.registry.default_base.key]
            if not healthy:
                return None
            least = min(healthy, key=lambda v: (v.queued, views.index(v)))
            return Route(least.name, False, None, "base")
        base = base or self.registry.default_base.key
        if self.policy == "round_robin":
            return route_blind(views, adapter, base, next(self._turns))
        if self.policy == "random":
            return route_blind(views, adapter, base, self._random.randrange(1 << 30))
        return route(views, adapter, base, self.epsilon, expected)

    async def place(self, version: AdapterVersion, exclude: Collection[str] = (), lease: bool = True) -> Placement:
        """Route a request to ``version`` and load the adapter there (an idle one swapped out if routing says so).

        ``lease``: the request is counted on the version there from the routing on (a retirement waits for it);
        the caller ends it with ``Placement.release``. Raises ``NoEngine``, ``AdapterMisfit``, ``EngineError``.
        """
        registry = self.registry
        manifest = await registry.amanifest(version)
        base = registry.base_for(manifest)
        if base is None and version.ref not in self.merged.values():
            raise NoEngine(registry.unserved_base(manifest) or "no engine serves its base model", unserved=True)
        key = base.key if base is not None else (manifest.base_model.sha256 or manifest.base_model.name)
        chosen = self.pick(version.ref, key, exclude, await registry.expected(key))
        if chosen is None:
            raise NoEngine("no engine serving its base model is up")
        side = registry.on(chosen.engine)
        release = side.lease(version) if lease else _nothing
        if registry.metrics is not None and lease:  # a request, not a warm-up
            registry.metrics.routed.labels(chosen.engine, chosen.reason).inc()
        if chosen.reason == "merged":
            return Placement(chosen.engine, BASE_MODEL_NAME, manifest, release, chosen.reason)
        side.reserve(version.ref)  # before any await: the next request sees it there
        try:
            if chosen.evict is not None:
                await side.evict(chosen.evict)
            manifest = await side.ensure_loaded(version)
        except BaseException as exc:
            release()
            if isinstance(exc, EngineError):
                self.mark_down(chosen.engine)
            raise
        return Placement(chosen.engine, version.ref, manifest, release, chosen.reason)

    async def warm(self, version: AdapterVersion) -> dict[str, object]:
        """Load ``version`` where its first request will go, so that request does not wait (admin writes)."""
        if not self.is_ready():
            return {"loaded": False}  # loaded once an engine is up (one engine: with every alias; a fleet: on demand)
        try:
            placed = await self.place(version, lease=False)
        except NoEngine as exc:
            return {"loaded": False, "warning" if exc.unserved else "load_error": str(exc)}
        except (EngineError, AdapterMisfit) as exc:
            return {"loaded": False, "load_error": str(exc)}
        return {"loaded": True, "engine": placed.engine}

    async def _poll(self) -> None:
        while True:
            await asyncio.gather(*(self._read_load(name) for name in list(self.members)))
            await asyncio.sleep(self.poll_s)

    async def _read_load(self, name: str) -> None:
        engine = self.members.get(name)
        if engine is None or not engine.is_ready():
            return
        try:
            self.loads[name] = parse_load((await engine.metrics()).decode(errors="replace"))
        except EngineError as exc:
            log.warning("engine %s: its load is not readable: %s", name, exc)
            self.mark_down(name)
        except ValueError as exc:  # an exposition that does not parse: keep the last load
            log.warning("engine %s: its metrics do not parse: %s", name, exc)
        else:
            self.up(name)


def _bound(on_ready: Callable[[str], Awaitable[None]], name: str) -> Callable[[], Awaitable[None]]:
    async def ready() -> None:
        await on_ready(name)

    return ready
