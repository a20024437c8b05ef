"""The gateway application.

    lorafleet serve                       # or: uvicorn --factory serving.app:create_app

``build_app`` wires settings, the state database, the adapter store and the
engine; the lifespan starts the engine (a supervised vLLM child process unless
``LORAFLEET_ENGINE_URL`` names one) and loads every alias's adapter whenever
the engine becomes healthy. Nothing happens at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from serving import errors
from serving.adapters import AdapterRegistry
from serving.canary import CanaryManager
from serving.changes import CANARIES, POLICIES, SERVING, TENANTS, ChangeFeed, announcer
from serving.config import GATEWAY_FILE, GatewaySettings, local_url
from serving.deps import GatewayState
from serving.engine import Engine, VLLMEngine
from serving.fleet.bases import ServedBase
from serving.fleet.config import EngineSpec, engine_specs
from serving.fleet.discovery import discovered
from serving.fleet.fleet import Fleet
from serving.ledger import open_store
from serving.limits import RedisLimiter, TenantLimiter
from serving.metrics import GatewayMetrics, StateCollector
from serving.middleware import BodySizeLimit
from serving.observe import Observe
from serving.policies import AliasPolicies
from serving.routes import admin, completions, health
from serving.routes import canaries as canaries_route
from serving.routes import metrics as metrics_route
from serving.tenants import TenantStore

log = logging.getLogger("lorafleet.gateway")


def build_app(settings: GatewaySettings, engine: Engine | dict[str, Engine] | None = None) -> FastAPI:
    """The gateway app; ``engine`` replaces the vLLM engines (tests pass fakes: one, or several by name)."""

    metrics = GatewayMetrics(tenant_label=settings.metrics_tenant_label, max_tenants=settings.metrics_max_tenants)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        declared = engine_specs(settings)
        dynamic = engine is None and any(spec.discover for spec in declared)
        specs = {spec.name: spec for spec in (await discovered(declared) if dynamic else declared)}
        if engine is None:
            engines: dict[str, Engine] = {name: VLLMEngine(settings, spec) for name, spec in specs.items()}
        else:
            engines = engine if isinstance(engine, dict) else {next(iter(specs)): engine}
        default = ServedBase.of(settings.base_model_path())
        tenants = TenantStore(settings.state_url, cache_s=settings.state_cache_s)
        store = await asyncio.to_thread(open_store, settings, tenants.engine)
        adapters = AdapterRegistry(store, engines, default, settings.max_lora_rank,
                                   serving_cache_s=settings.state_cache_s,
                                   engine_bases=_engine_bases(settings, specs, engines))  # fmt: skip
        max_loras = {name: specs[name].max_loras if name in specs else settings.max_loras for name in engines}
        merged = {name: spec.merged for name, spec in specs.items() if spec.merged and name in engines}
        eng = Fleet(engines, adapters, max_loras, epsilon=settings.route_epsilon, poll_s=settings.engine_poll_s,
                    dynamic=dynamic, merged=merged, policy=settings.route_policy)  # fmt: skip
        policies = AliasPolicies(tenants.engine, cache_s=settings.state_cache_s)
        adapters.metrics = metrics
        adapters.drain_limit_s = settings.upstream_timeout_s + 60  # past any request another gateway sent
        canaries = CanaryManager(tenants.engine, adapters, metrics, warm=eng.warm)
        metrics.add_state(StateCollector(eng.is_ready, lambda: eng.restarts, lambda: len(adapters.loaded),
                                         canaries.weights,
                                         lambda: len(adapters.pending(eng.several)) if eng.is_ready() else 0,
                                         eng.describe))  # fmt: skip
        limiter: TenantLimiter | RedisLimiter = TenantLimiter()
        if settings.redis_url is not None:  # a lease outlives the longest request the engine may take
            limiter = RedisLimiter(
                settings.redis_url,
                timeout_s=settings.redis_timeout_s,
                fail_open=settings.redis_fail_open,
                lease_s=settings.upstream_timeout_s + 60,
            )
        app.state.gateway = GatewayState(settings, eng, tenants, adapters, limiter, policies, metrics, canaries)

        async def on_engine_ready(name: str) -> None:
            eng.up(name)
            if eng.several:  # a fleet loads adapters where requests are routed; it holds what it says
                if not await eng.check_base(name):
                    return
                await adapters.on(name).reconcile()
                return
            problems = await adapters.load_all(name)
            for problem in problems:
                log.error("adapter not loaded: %s", problem)

        await eng.start(on_engine_ready)
        # What start-up made lives as long as the process: out of the collector's sight, a full
        # collection under load walks far fewer objects (a long pause shows up in every tail latency).
        gc.collect()
        gc.freeze()
        analysis = asyncio.create_task(canaries.run(settings.canary_poll_s))
        feed = None
        if ChangeFeed.wanted(settings.state_url):  # several gateways on PostgreSQL: hear each other's writes
            adapters.announce = announcer(tenants.engine)
            feed = ChangeFeed(settings.state_url, {TENANTS: tenants.changed, POLICIES: policies.changed,
                                                   SERVING: adapters.forget, CANARIES: canaries.wake})  # fmt: skip
            app.state.changes = feed
        listening = asyncio.create_task(feed.run()) if feed is not None else None
        discovery = asyncio.create_task(_rediscover(settings, declared, eng)) if dynamic else None
        app.state.instance = secrets.token_hex(8)
        announced = _announce(settings, app.state.instance)
        try:
            yield
        finally:
            announced.unlink(missing_ok=True)
            analysis.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await analysis  # its end gives up canary leadership now, for another gateway to take at once
            if listening is not None:
                listening.cancel()
            if discovery is not None:
                discovery.cancel()
            await eng.stop()
            if isinstance(limiter, RedisLimiter):
                await limiter.close()

    # Only the listed routes exist: no docs pages, and no redirect from "/v1/models/" to "/v1/models".
    app = FastAPI(title="lorafleet gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)  # fmt: skip
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       uploads=(admin.UPLOAD_PATH, settings.max_upload_bytes))  # fmt: skip
    app.add_middleware(Observe, metrics=metrics, log_content=settings.log_content)  # outermost: sees every response
    app.include_router(health.router)
    app.include_router(metrics_route.router)
    app.include_router(completions.router)
    app.include_router(admin.router)
    app.include_router(canaries_route.router)
    return app


async def _rediscover(settings: GatewaySettings, declared: list[EngineSpec], fleet: Fleet) -> None:
    """Resolve the discovered entries again every ``discovery_s``; add the engines that appeared, remove the gone."""
    static = {spec.name for spec in declared if spec.discover is None}
    while True:
        await asyncio.sleep(settings.discovery_s)
        try:
            now = {spec.name: spec for spec in await discovered(declared)}
            for name in set(fleet.members) - set(now) - static:
                await fleet.remove(name, grace_s=settings.upstream_timeout_s)
            for name in set(now) - set(fleet.members):
                spec = now[name]
                base = _served_base(settings, spec.base) if spec.base else None
                await fleet.add(name, VLLMEngine(settings, spec), spec.max_loras, base, spec.merged)
        except Exception:  # one failed round must not end discovery
            log.exception("engine discovery failed")


def _engine_bases(settings: GatewaySettings, specs: dict[str, EngineSpec], engines: dict[str, Engine]) -> dict[
        str, ServedBase]:  # fmt: skip
    """The engines that serve a base model of their own (``base:`` in the engines file)."""
    return {name: _served_base(settings, spec.base) for name, spec in specs.items() if spec.base and name in engines}


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


def create_app() -> FastAPI:
    """Factory for ``uvicorn --factory``: settings from the environment."""
    return build_app(GatewaySettings())
