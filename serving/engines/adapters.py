"""Alias → adapter version → engine-side name, and loading adapters onto the engine.

An alias serves its newest version in the store. Before an adapter reaches an
engine it is checked against the served base model (weights checksum, rank,
target modules), so a misfit is refused with a clear error instead of failing
inside vLLM. Loading is guarded by a lock per adapter and engine, so
concurrent first requests load it once.

``AdapterRegistry`` is the store's side (which version serves an alias, fit
checks) over one ``EngineAdapters`` per engine (what that engine holds, the
requests in flight there, the drains of retired versions). With one engine,
every method's ``engine`` argument can be left out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.basemodel import BaseModelRecord
from contract.fit import fit_problems
from contract.manifest import AdapterManifest, ManifestError, read_manifest
from contract.store import AdapterStore, AdapterVersion, StoreError
from serving.engines.bases import ServedBase, base_for
from serving.engines.load import parse_load
from serving.engines.protocol import Engine
from serving.metrics import GatewayMetrics
from serving.state.cache import ReadCache
from serving.state.changes import SERVING

log = logging.getLogger("lorafleet.adapters")


# How often a retired version's unload is tried again while the engine reports requests for it.
DRAIN_POLL_S = 1.0


class AdapterMisfit(ValueError):
    """The adapter cannot be served on this engine; the message says why."""


class EngineAdapters:
    """The adapters one engine holds, its requests in flight per version, and the drains of retired versions."""

    def __init__(self, name: str, engine: Engine, registry: AdapterRegistry) -> None:
        self.name, self.engine, self.registry = name, engine, registry
        self.loaded: dict[str, AdapterVersion] = {}
        self.in_flight: dict[str, int] = {}  # requests running per version ref
        self._draining: set[str] = set()  # retired refs to unload when their last request ends
        self._locks: dict[str, asyncio.Lock] = {}
        self.loading: set[str] = set()  # routed here and being loaded: resident, as far as routing goes
        self._drain_since: dict[str, float] = {}  # retired refs waiting for the engine's other requests on them
        self._later: dict[str, asyncio.Task[None]] = {}  # their next unload attempt

    @property
    def store(self) -> AdapterStore:
        return self.registry.store

    def reserve(self, ref: str) -> None:
        """Routing chose this engine for ``ref``: counted as resident from now on, while it loads (without
        this, requests arriving during the load would find it nowhere and load it on another engine too)."""
        if ref not in self.loaded:
            self.loading.add(ref)

    async def ensure_loaded(self, version: AdapterVersion) -> AdapterManifest:
        if version.ref in self.loaded:  # it passed check_fits when it was loaded
            self.loading.discard(version.ref)
            return self.registry.manifest(version)
        self.loading.add(version.ref)
        try:
            return await self._load(version)
        finally:
            self.loading.discard(version.ref)

    async def _load(self, version: AdapterVersion) -> AdapterManifest:
        # Reads files: never on the event loop.
        manifest, retired = await asyncio.to_thread(
            lambda: (self.registry.check_fits(version, self.name), self.store.is_retired(version))
        )
        async with self._lock(version.ref):  # one load (or unload) of the same adapter at a time
            if version.ref not in self.loaded:
                metrics = self.registry.metrics
                started = time.perf_counter()
                try:
                    await self.engine.load_adapter(version.ref, version.path)
                except BaseException as exc:
                    self.registry.load_failures[version.ref] = str(exc) or type(exc).__name__
                    if metrics is not None:
                        metrics.adapter_loaded(time.perf_counter() - started, ok=False, engine=self.name)
                    raise
                self.registry.load_failures.pop(version.ref, None)
                if metrics is not None:
                    metrics.adapter_loaded(time.perf_counter() - started, ok=True, engine=self.name)
                self.loaded[version.ref] = version
                if retired:  # a request routed here before the retirement: unloaded again once such ones end
                    self._draining.add(version.ref)
                else:
                    self._draining.discard(version.ref)
                log.info("loaded adapter %s on %s from %s", version.ref, self.name, version.path)
        return manifest

    async def reload(self, version: AdapterVersion) -> None:
        """Load ``version`` again: the engine answered that it does not have it (restarted, or raced an unload)."""
        async with self._lock(version.ref):
            self.loaded.pop(version.ref, None)
        await self.ensure_loaded(version)

    def _lock(self, ref: str) -> asyncio.Lock:
        return self._locks.setdefault(ref, asyncio.Lock())

    async def _others_running(self, ref: str) -> bool:
        """Whether the engine itself has requests for ``ref`` running or waiting: another gateway's, when this
        one has none (``vllm:lora_requests_info``). Past ``drain_limit_s`` since the drain began, or when the
        engine does not answer, no: no request outlives the gateways' upstream timeout."""
        since = self._drain_since.setdefault(ref, time.monotonic())
        if time.monotonic() - since > self.registry.drain_limit_s:
            log.warning(
                "unloading %s from %s although the engine still reports requests for it, %.0f s after its retirement",
                ref,
                self.name,
                time.monotonic() - since,
            )
            return False
        try:
            load = parse_load((await self.engine.metrics()).decode("utf-8", "replace"))
        except Exception:  # the engine is restarting (it forgets its adapters then) or unreachable
            return False
        return ref in load.working_set

    def _unload_later(self, ref: str) -> None:
        async def later() -> None:
            await asyncio.sleep(DRAIN_POLL_S)
            self._later.pop(ref, None)  # from here on, the next attempt may be scheduled
            await self._unload(ref)

        if ref not in self._later:
            self._later[ref] = asyncio.get_running_loop().create_task(later())

    def lease(self, version: AdapterVersion) -> Callable[[], None]:
        """Count a request on ``version`` until the returned release function is called (idempotent)."""
        self.in_flight[version.ref] = self.in_flight.get(version.ref, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.in_flight[version.ref] -= 1
            if self.in_flight[version.ref] == 0 and version.ref in self._draining:
                asyncio.get_running_loop().create_task(self._unload(version.ref))

        return release

    def busy(self) -> int:
        """Requests in flight on this engine (the gateway's own count, exact between metric polls)."""
        return sum(self.in_flight.values())

    async def retire(self, version: AdapterVersion) -> None:
        """Unload a retired version now, or after its last in-flight request when some are running."""
        if version.ref not in self.loaded:
            return
        self._draining.add(version.ref)
        if self.in_flight.get(version.ref, 0) == 0:
            await self._unload(version.ref)

    async def evict(self, ref: str) -> None:
        """Unload an adapter no request needs, to make room for another (routing's idle slot)."""
        async with self._lock(ref):
            if self.in_flight.get(ref, 0) > 0 or ref not in self.loaded:
                return
            self.loaded.pop(ref, None)
            try:
                await self.engine.unload_adapter(ref)
            except Exception as exc:
                log.warning("could not unload %s from %s: %s", ref, self.name, exc)
            if self.registry.metrics is not None:
                self.registry.metrics.adapter_unloaded(self.name, evicted=True)
            log.info("swapped adapter %s out of %s", ref, self.name)

    async def _unload(self, ref: str) -> None:
        async with self._lock(ref):
            if ref not in self._draining or self.in_flight.get(ref, 0) > 0 or ref not in self.loaded:
                return
            # Promoted back (or canaried) since its retirement: it serves again, so its drain is cancelled.
            if not await asyncio.to_thread(self.store.is_retired, self.loaded[ref]):
                self._draining.discard(ref)
                return
            if self.in_flight.get(ref, 0) > 0 or ref not in self.loaded:  # a request came while the store was read
                return
            if await self._others_running(ref):  # other gateways' requests on this engine: unload after them
                self._unload_later(ref)
                return
            self._drain_since.pop(ref, None)
            # Out of ``loaded`` first: what the gateway believes loaded is always on the engine (a request for it
            # meanwhile loads it again, once this unload is done).
            self.loaded.pop(ref, None)
            self._draining.discard(ref)
            try:
                await self.engine.unload_adapter(ref)
            except Exception as exc:  # the engine may be restarting; it forgets adapters then anyway
                log.warning("could not unload %s: %s", ref, exc)
            if self.registry.metrics is not None:
                self.registry.metrics.adapter_unloaded(self.name, evicted=False)
            log.info("unloaded retired adapter %s from %s", ref, self.name)

    async def reconcile(self) -> None:
        """After the engine (re)started: it holds only what it says it holds (vLLM forgets runtime loads)."""
        try:
            held = set(await self.engine.adapters())
        except Exception as exc:
            log.warning("cannot read the adapters %s holds: %s", self.name, exc)
            held = set()
        self.loaded = {ref: v for ref, v in self.loaded.items() if ref in held}


class AdapterRegistry:
    def __init__(
        self,
        store: AdapterStore,
        engine: Engine | dict[str, Engine],
        base: BaseModelRecord | ServedBase,
        max_lora_rank: int,
        base_config: dict[str, Any] | None = None,
        serving_cache_s: float = 1.0,
        engine_bases: dict[str, ServedBase] | None = None,
        outage_s: float = 0.0,
    ) -> None:
        # The gateway's base model (LORAFLEET_BASE_MODEL), and the engines that serve another one (engines file).
        self.default_base = base if isinstance(base, ServedBase) else ServedBase("", base, base_config)
        self.store, self.base, self.max_lora_rank = store, self.default_base.record, max_lora_rank
        self.engine_bases = dict(engine_bases or {})
        engines = engine if isinstance(engine, dict) else {"engine": engine}
        self.engines: dict[str, EngineAdapters] = {name: EngineAdapters(name, e, self) for name, e in engines.items()}
        # alias -> (its serving version,): read off the event loop, kept ``serving_cache_s``, cleared by ``changed``,
        # served up to ``outage_s`` longer while the store's ledger (PostgreSQL for a fleet) does not answer
        self._serving: ReadCache[tuple[AdapterVersion | None]] = ReadCache(serving_cache_s, outage_s=outage_s)
        self._all_serving: ReadCache[dict[str, frozenset[str]]] = ReadCache(serving_cache_s, outage_s=outage_s)
        self.announce: Callable[[str], None] | None = None  # tells the other gateways (serving.state.changes.announcer)
        # The longest a retired version waits on the engine for requests other gateways sent there (the app sets
        # it past their upstream timeout).
        self.drain_limit_s = 660.0
        self.metrics: GatewayMetrics | None = None  # set by the app: load/unload counts and durations
        self._manifests: dict[str, AdapterManifest] = {}
        self.load_failures: dict[str, str] = {}  # version ref -> why its last load failed (cleared by a success)

    def add_engine(self, name: str, engine: Engine, base: ServedBase | None = None) -> None:
        self.engines[name] = EngineAdapters(name, engine, self)
        if base is not None:
            self.engine_bases[name] = base

    def base_of(self, engine: str) -> ServedBase:
        """The base model engine ``engine`` serves."""
        return self.engine_bases.get(engine, self.default_base)

    def served_bases(self) -> list[ServedBase]:
        """The base models the engines serve, the gateway's own first (each once)."""
        bases = {self.default_base.key: self.default_base} if set(self.engines) - set(self.engine_bases) else {}
        for name in self.engines:
            base = self.base_of(name)
            bases.setdefault(base.key, base)
        return list(bases.values())

    def base_for(self, manifest: AdapterManifest) -> ServedBase | None:
        """The served base model an adapter was trained on; ``None`` when no engine serves it."""
        return base_for(manifest, self.served_bases())

    async def amanifest(self, version: AdapterVersion) -> AdapterManifest:
        """``manifest``, read in a worker thread the first time (the store may be a network volume)."""
        if version.ref in self._manifests:
            return self._manifests[version.ref]
        return await asyncio.to_thread(self.manifest, version)

    def remove_engine(self, name: str) -> None:
        """Forget an engine's side (its in-flight requests keep their leases, which end normally)."""
        self.engines.pop(name, None)
        self.engine_bases.pop(name, None)

    def on(self, engine: str | None = None) -> EngineAdapters:
        """One engine's side (the first, when not named)."""
        return self.engines[engine] if engine is not None else next(iter(self.engines.values()))

    @property
    def engine(self) -> Engine:
        return self.on().engine

    @property
    def loaded(self) -> dict[str, AdapterVersion]:
        """Every version loaded on some engine."""
        return {ref: v for side in self.engines.values() for ref, v in side.loaded.items()}

    @property
    def in_flight(self) -> dict[str, int]:
        """Requests in flight per version, all engines together."""
        total: dict[str, int] = {}
        for side in self.engines.values():
            for ref, n in side.in_flight.items():
                total[ref] = total.get(ref, 0) + n
        return total

    def resolve(self, alias: str) -> AdapterVersion | None:
        try:
            return self.store.serving(alias)
        except StoreError:
            return None

    def serving_versions(self) -> list[tuple[str, AdapterVersion]]:
        """Every alias with a serving version, and that version (read from the store: not on the event loop)."""
        return [(alias, version) for alias in self.store.aliases() if (version := self.resolve(alias)) is not None]

    async def serving(self, alias: str) -> AdapterVersion | None:
        """``resolve`` for a request: from memory, else read from the store in a worker thread (the store may be
        a network volume; the event loop never waits on it)."""
        return (await self._serving.aget(alias, lambda: (self.resolve(alias),)))[0]

    def changed(self) -> None:
        """The store was written (publish, promote, retire): what ``serving`` remembers is dropped, here and, through
        ``announce`` (``serving.state.changes``), in every other gateway."""
        self.forget()
        if self.announce is not None:
            self.announce(SERVING)

    def forget(self) -> None:
        """Drop what ``serving`` remembers (another gateway announced a write to the store)."""
        self._serving.changed()
        self._all_serving.changed()

    async def expected(self, base: str | None = None) -> frozenset[str]:
        """The versions requests may go to on the base model keyed ``base`` (the gateway's own when None): every
        such alias's serving version (routing keeps slots for them)."""
        every = await self._all_serving.aget("all", self._read_all_serving)
        return every.get(base or self.default_base.key, frozenset())

    def _read_all_serving(self) -> dict[str, frozenset[str]]:
        by_base: dict[str, set[str]] = {}
        for _, version in self.serving_versions():
            try:
                base = self.base_for(self.manifest(version))
            except (ManifestError, OSError):
                continue
            if base is not None:
                by_base.setdefault(base.key, set()).add(version.ref)
        return {key: frozenset(refs) for key, refs in by_base.items()}

    def manifest(self, version: AdapterVersion) -> AdapterManifest:
        if version.ref not in self._manifests:
            self._manifests[version.ref] = version.manifest()
        return self._manifests[version.ref]

    def check_fits(self, version: AdapterVersion, engine: str | None = None) -> AdapterManifest:
        """The manifest of ``version`` if ``engine`` (the first, when not named) can serve it; else AdapterMisfit."""
        problems = self.fit_problems(version.path, self.base_of(engine or next(iter(self.engines))))
        if problems:
            raise AdapterMisfit(f"adapter {version.ref} cannot be served: " + "; ".join(problems))
        return self.manifest(version)

    def fit_problems(self, adapter_dir: Path, base: ServedBase | None = None) -> list[str]:
        """Every reason the adapter in ``adapter_dir`` cannot be served on ``base`` (``contract.fit``).

        Without ``base``: on the served base model it was trained on; if no engine serves that one, everything
        but the base (which ``unserved_base`` reports) is checked, so it can be published ahead of its engines,
        unless a served base has its base's name with other weights: then it is checked against that one.
        """
        if base is None:
            try:
                manifest = read_manifest(adapter_dir)
            except ManifestError as exc:
                return [str(exc)]
            wanted = manifest.base_model
            namesake = [b for b in self.served_bases() if b.record.name == wanted.name]
            # Trained on other weights under the name of a base the engines serve (another revision, a tampered
            # manifest): the served one is what it claims to fit, so it is checked (and refused) against it.
            base = self.base_for(manifest) or (namesake[0] if namesake else None)
            if base is None:
                base = ServedBase("", BaseModelRecord(name=wanted.name, sha256=wanted.sha256, source="manifest"))
        return fit_problems(
            adapter_dir,
            base_name=base.record.name,
            base_sha256=base.record.sha256,
            base_config=base.config,
            max_lora_rank=self.max_lora_rank,
        )

    def unserved_base(self, manifest: AdapterManifest) -> str | None:
        """Why no engine can serve an adapter with this manifest (its base model is served by none), or None."""
        if self.base_for(manifest) is not None:
            return None
        wanted = manifest.base_model
        served = ", ".join(f"{b.record.name} ({b.record.sha256[:12]})" for b in self.served_bases())
        return (
            f"no engine serves its base model {wanted.name} ({wanted.sha256[:12]}); the engines serve {served}. "
            "It is stored, and served once an engine with that base joins (docs/operations.md)"
        )

    async def ensure_loaded(self, version: AdapterVersion, engine: str | None = None) -> AdapterManifest:
        return await self.on(engine).ensure_loaded(version)

    async def reload(self, version: AdapterVersion, engine: str | None = None) -> None:
        await self.on(engine).reload(version)

    def lease(self, version: AdapterVersion, engine: str | None = None) -> Callable[[], None]:
        return self.on(engine).lease(version)

    async def retire(self, version: AdapterVersion) -> None:
        """Unload a retired version from every engine, each once its in-flight requests there are done."""
        for side in self.engines.values():
            await side.retire(version)

    async def load_all(self, engine: str | None = None) -> list[str]:
        """Load every alias's current version on an engine (at its start and after a restart); the problems."""
        side = self.on(engine)
        side.loaded.clear()
        problems = []
        for _, version in self.serving_versions():
            try:
                base = self.base_for(self.manifest(version))
                if base is None or base.key != self.base_of(side.name).key:
                    continue  # for another base model (``unserved`` lists it when no engine serves that one)
                await side.ensure_loaded(version)
            except Exception as exc:  # one bad adapter must not keep the others off the engine
                problems.append(str(exc))
                log.error("%s", exc)
        return problems

    def pending(self, lazy: bool = False) -> list[str]:
        """Aliases whose serving version cannot be answered now: loaded on no engine, or (``lazy``, a fleet, which
        loads an adapter on its first request) whose last load failed or whose base model no engine serves."""
        loaded = self.loaded
        missing = []
        for alias, version in self.serving_versions():
            if version.ref in loaded:
                continue
            if lazy and version.ref not in self.load_failures and not self.unserved(version):
                continue
            missing.append(alias)
        return missing

    def unserved(self, version: AdapterVersion) -> str | None:
        """``unserved_base`` for a stored version (an unreadable manifest: it says so)."""
        try:
            return self.unserved_base(self.manifest(version))
        except (ManifestError, OSError) as exc:
            return str(exc)

    def unserved_aliases(self) -> dict[str, str]:
        """Alias -> why its serving version has no engine (its base model is served by none)."""
        out = {}
        for alias, version in self.serving_versions():
            if why := self.unserved(version):
                out[alias] = f"{version.ref}: {why}"
        return out
