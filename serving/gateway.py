"""Everything the gateway holds while it runs, started in order and stopped in reverse.

``Gateway.running`` builds the parts from the settings (the engines, the state
database's stores, the adapter registry, the limiter, the canary manager),
starts the engines (a supervised vLLM child process unless the engines file or
``LORAFLEET_ENGINE_URL`` names running ones) and the background work (the
canary loop, the change feed of several gateways on PostgreSQL, engine
discovery), and yields the ``Gateway`` the routes use. Every start pushes its
stop onto one ``AsyncExitStack``, so leaving the context stops exactly what was
started, in reverse, also when start-up fails half-way.

No web framework here: the app (``serving.app``) runs this in its lifespan.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.store import AdapterStore
from serving.canary.manager import CanaryManager
from serving.canary.rollouts import Rollouts
from serving.config import GATEWAY_FILE, GatewaySettings, local_url
from serving.engines.adapters import AdapterRegistry
from serving.engines.bases import ServedBase
from serving.engines.discovery import discovered
from serving.engines.fleet import Fleet
from serving.engines.protocol import Engine
from serving.engines.specs import EngineSpec, engine_specs
from serving.engines.vllm import VLLMEngine
from serving.metrics import GatewayMetrics, JobsCollector, StateCollector
from serving.outputs.schemas import SchemaChecks
from serving.state.canaries import CanaryRecords
from serving.state.changes import CANARIES, POLICIES, SERVING, TENANTS, ChangeFeed, announcer
from serving.state.files import FileStore
from serving.state.jobs import JobStore
from serving.state.leadership import Leadership
from serving.state.ledger import open_store
from serving.state.limits import RedisLimiter, TenantLimiter
from serving.state.policies import AliasPolicies
from serving.state.rollouts import RolloutRecords
from serving.state.tenants import TenantStore

log = logging.getLogger("lorafleet.gateway")


@dataclass
class Gateway:
    """The running gateway's parts, as the routes see them (``serving.http.deps.StateDep``)."""

    settings: GatewaySettings
    engine: Fleet  # the engines, as one for readiness and restarts; ``place`` and ``pick`` route a request
    tenants: TenantStore
    adapters: AdapterRegistry
    limiter: TenantLimiter | RedisLimiter
    policies: AliasPolicies
    metrics: GatewayMetrics
    canaries: CanaryManager
    schema_checks: SchemaChecks  # clients' JSON Schemas are checked here, one per tenant at a time
    files: FileStore  # the files tenants upload (fine-tuning data)
    jobs: JobStore  # fine-tuning jobs (run by workers, package ``finetune``; the gateway serves what they make)
    jobs_gauges: JobsCollector = field(default_factory=JobsCollector)  # the queue, as last read
    instance: str = ""  # this process's id, in /healthz and data_dir/gateway.json
    changes: ChangeFeed | None = None  # several gateways on PostgreSQL: how this one hears the others' writes
    rollouts: Rollouts | None = None  # jobs into an alias: their canary started and followed (``serving.canary``)

    @classmethod
    @asynccontextmanager
    async def running(
        cls, settings: GatewaySettings, metrics: GatewayMetrics, engine: Engine | dict[str, Engine] | None = None
    ) -> AsyncIterator[Gateway]:
        """Start everything; stop it all on the way out. ``engine`` replaces the vLLM engines (tests pass fakes:
        one, or several by name)."""
        async with AsyncExitStack() as stack:
            last_good: dict[str, list[str]] = {}  # each discovered entry's addresses when DNS last answered
            gateway, declared, dynamic = await cls._build(settings, metrics, engine, last_good)
            stack.callback(gateway.schema_checks.close)
            if isinstance(gateway.limiter, RedisLimiter):
                stack.push_async_callback(gateway.limiter.close)
            fleet = gateway.engine
            stack.push_async_callback(fleet.stop)
            await fleet.start(functools.partial(_on_engine_ready, gateway))
            # What start-up made lives as long as the process: out of the collector's sight, a full
            # collection under load walks far fewer objects (a long pause shows up in every tail latency).
            gc.collect()
            gc.freeze()
            if ChangeFeed.wanted(settings.state_url):  # several gateways on PostgreSQL: hear each other's writes
                gateway.adapters.announce = announcer(gateway.tenants.engine)
                gateway.changes = ChangeFeed(
                    settings.state_url,
                    {
                        TENANTS: gateway.tenants.changed,
                        POLICIES: gateway.policies.changed,
                        SERVING: gateway.adapters.forget,
                        CANARIES: gateway.canaries.wake,
                    },
                )
                await stack.enter_async_context(_background(gateway.changes.run()))
            if dynamic:
                await stack.enter_async_context(_background(_rediscover(settings, declared, fleet, last_good)))
            await stack.enter_async_context(_background(_follow_jobs(gateway)))
            # Stopped first of all: its end gives up canary leadership, for another gateway to take at once.
            await stack.enter_async_context(_background(gateway.canaries.run(settings.canary_poll_s)))
            gateway.instance = secrets.token_hex(8)
            stack.callback(_announce(settings, gateway.instance).unlink, missing_ok=True)
            yield gateway

    @classmethod
    async def _build(
        cls,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        engine: Engine | dict[str, Engine] | None,
        last_good: dict[str, list[str]],
    ) -> tuple[Gateway, list[EngineSpec], bool]:
        """The parts, wired to each other, nothing started yet."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        declared = engine_specs(settings)
        dynamic = engine is None and any(spec.discover for spec in declared)
        specs = {spec.name: spec for spec in (await discovered(declared, last_good=last_good) if dynamic else declared)}
        tenants = TenantStore(settings.state_url, cache_s=settings.state_cache_s, outage_s=settings.state_outage_s)
        store = await asyncio.to_thread(open_store, settings, tenants.engine)
        fleet = _fleet(settings, specs, engine, store, dynamic)
        adapters = fleet.registry
        adapters.metrics = metrics
        canaries = CanaryManager(
            CanaryRecords(tenants.engine),
            Leadership(tenants.engine),
            adapters,
            metrics,
            warm=fleet.warm,
            announce=announcer(tenants.engine),
        )
        metrics.add_state(
            StateCollector(
                fleet.is_ready,
                lambda: fleet.restarts,
                lambda: len(adapters.loaded),
                canaries.weights,
                lambda: len(adapters.pending(fleet.several)) if fleet.is_ready() else 0,
                fleet.describe,
            )
        )
        policies = AliasPolicies(tenants.engine, cache_s=settings.state_cache_s, outage_s=settings.state_outage_s)
        checks = SchemaChecks(settings.schema_check_threads)
        files = FileStore(tenants.engine, settings.files_root, settings.max_file_bytes, settings.file_quota_bytes)
        jobs = JobStore(tenants.engine)
        limiter = _limiter(settings)
        gateway = cls(settings, fleet, tenants, adapters, limiter, policies, metrics, canaries, checks, files, jobs)
        gateway.rollouts = Rollouts(RolloutRecords(tenants.engine), canaries, policies)
        metrics.add_state(gateway.jobs_gauges)
        return gateway, declared, dynamic


def _fleet(
    settings: GatewaySettings,
    specs: dict[str, EngineSpec],
    engine: Engine | dict[str, Engine] | None,
    store: AdapterStore,
    dynamic: bool,
) -> Fleet:
    """The engines (vLLM, or the ones given), the registry of what each holds, and the router over them."""
    if engine is None:
        engines: dict[str, Engine] = {name: VLLMEngine(settings, spec) for name, spec in specs.items()}
    else:
        engines = engine if isinstance(engine, dict) else {next(iter(specs)): engine}
    own_bases = {
        name: _served_base(settings, spec.base) for name, spec in specs.items() if spec.base and name in engines
    }
    adapters = AdapterRegistry(
        store,
        engines,
        ServedBase.of(settings.base_model_path()),
        settings.max_lora_rank,
        serving_cache_s=settings.state_cache_s,
        engine_bases=own_bases,
        outage_s=settings.state_outage_s,
    )
    adapters.drain_limit_s = settings.upstream_timeout_s + 60  # past any request another gateway sent
    max_loras = {name: specs[name].max_loras if name in specs else settings.max_loras for name in engines}
    merged = {name: spec.merged for name, spec in specs.items() if spec.merged and name in engines}
    return Fleet(
        engines,
        adapters,
        max_loras,
        epsilon=settings.route_epsilon,
        poll_s=settings.engine_poll_s,
        dynamic=dynamic,
        merged=merged,
        policy=settings.route_policy,
    )


def _limiter(settings: GatewaySettings) -> TenantLimiter | RedisLimiter:
    """Per-tenant limits: counted in this process, or across the gateways in Redis."""
    if settings.redis_url is None:
        return TenantLimiter()
    return RedisLimiter(  # a lease outlives the longest request the engine may take
        settings.redis_url,
        timeout_s=settings.redis_timeout_s,
        fail_open=settings.redis_fail_open,
        lease_s=settings.upstream_timeout_s + 60,
    )


async def _on_engine_ready(gateway: Gateway, name: str) -> None:
    """An engine passed its health check: load what it should hold."""
    fleet, adapters = gateway.engine, gateway.adapters
    fleet.up(name)
    if fleet.several:  # a fleet loads adapters where requests are routed; it holds what it says
        if await fleet.check_base(name):
            await adapters.on(name).reconcile()
        return
    for problem in await adapters.load_all(name):
        log.error("adapter not loaded: %s", problem)


async def _follow_jobs(gateway: Gateway, every_s: float = 1.0, metrics_every_s: float = 5.0) -> None:
    """Fine-tuning jobs, as they end in workers anywhere: a succeeded job's model is served at once (the tenant's
    grant and the new alias read again, not after ``state_cache_s``, and the adapter loaded where its first
    request will go); a job into an alias has its rollout followed (``serving.canary.rollouts``); every ended job
    is counted in the metrics once; the queue's gauges are refreshed. The same on SQLite and PostgreSQL: the jobs'
    table is the one place every worker writes."""
    seen: set[str] = set()  # the succeeded jobs of the window already served
    since = time.time() - 60
    measured = 0.0
    while True:
        await asyncio.sleep(every_s)
        try:
            since, seen = await _serve_finished(gateway, since, seen)
            if gateway.rollouts is not None:
                await gateway.rollouts.tick()
            if time.monotonic() - measured >= metrics_every_s:
                measured = time.monotonic()
                await asyncio.to_thread(_measure_jobs, gateway)
        except Exception:  # the state database or an engine is away: the next round tries again
            log.warning("following fine-tuning jobs failed this round", exc_info=True)


async def _serve_finished(gateway: Gateway, since: float, seen: set[str]) -> tuple[float, set[str]]:
    """Serve the models of jobs that succeeded since ``since`` and are not in ``seen``; the next window."""
    jobs = await asyncio.to_thread(gateway.jobs.finished_since, since)
    fresh = [job for job in jobs if job.id not in seen and job.fine_tuned_model]
    seen = {job.id for job in jobs}
    if not fresh:
        return since, seen
    gateway.tenants.changed()
    gateway.adapters.forget()
    for job in fresh:
        try:  # one model that will not load must not hold up the others (it is loaded on demand anyway)
            version = await gateway.adapters.serving(str(job.fine_tuned_model))
            if version is not None:
                placed = await gateway.engine.warm(version)
                log.info("fine-tuned model %s (job %s) served: %s", job.fine_tuned_model, job.id, placed)
        except Exception:
            log.warning("fine-tuned model %s (job %s) not loaded ahead", job.fine_tuned_model, job.id, exc_info=True)
    return max(job.finished_at or 0 for job in fresh) - 2, seen


def _measure_jobs(gateway: Gateway) -> None:
    gateway.jobs_gauges.snapshot = gateway.jobs.snapshot(alive_s=30.0)
    metrics = gateway.metrics
    for job in gateway.jobs.to_report():
        metrics.jobs_finished.labels(job.status).inc()
        if job.started_at is not None:
            metrics.job_queue_wait.observe(max(0, job.started_at - job.created_at))
            metrics.job_run_time.labels(job.status).observe(
                max(0, (job.finished_at or job.started_at) - job.started_at)
            )
        if job.status == "succeeded" and job.trained_tokens:
            metrics.trained_tokens.inc(job.trained_tokens)


@asynccontextmanager
async def _background(work: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """``work`` as a task for as long as the context lasts; cancelled, and waited for, when it ends."""
    task = asyncio.create_task(work)
    try:
        yield
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:  # it had failed on its own: said, without failing the shutdown
            log.exception("background work %s had stopped with an error", task.get_name())


async def _rediscover(
    settings: GatewaySettings, declared: list[EngineSpec], fleet: Fleet, last_good: dict[str, list[str]]
) -> None:
    """Resolve the discovered entries again every ``discovery_s``; add the engines that appeared, remove the gone."""
    static = {spec.name for spec in declared if spec.discover is None}
    while True:
        await asyncio.sleep(settings.discovery_s)
        try:
            now = {spec.name: spec for spec in await discovered(declared, last_good=last_good)}
            for name in set(fleet.members) - set(now) - static:
                await fleet.remove(name, grace_s=settings.upstream_timeout_s)
            for name in set(now) - set(fleet.members):
                spec = now[name]
                base = _served_base(settings, spec.base) if spec.base else None
                await fleet.add(name, VLLMEngine(settings, spec), spec.max_loras, base, spec.merged)
        except Exception:  # one failed round must not end discovery
            log.exception("engine discovery failed")


@functools.cache
def _served_base_at(path: str) -> ServedBase:
    return ServedBase.of(path)


def _served_base(settings: GatewaySettings, model: str) -> ServedBase:
    """A base model named as in ``LORAFLEET_BASE_MODEL``, identified once per path (its weights are hashed)."""
    return _served_base_at(settings.model_path(model))


def _announce(settings: GatewaySettings, instance: str) -> Path:
    """Say where this gateway listens (``data_dir/gateway.json``): the CLI sends its writes here while it runs.

    ``instance`` (also in ``/healthz``) lets the CLI check that what answers at
    that address is this gateway, not another one on the same port.
    """
    path = settings.data_dir / GATEWAY_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    record = {"url": local_url(settings), "pid": os.getpid(), "instance": instance}
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path
