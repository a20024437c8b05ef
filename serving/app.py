"""The gateway application.

    lorafleet serve                       # or: uvicorn --factory serving.app:create_app

``build_app`` makes the FastAPI app: its error handlers, middleware and
routers, and a lifespan that runs the ``serving.gateway.Gateway`` (the
engines, the state, the background work) for as long as the app serves.
Nothing happens at import time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serving.config import GatewaySettings
from serving.engines.protocol import Engine
from serving.gateway import Gateway
from serving.http import errors
from serving.http.deps import UPLOAD_PATH
from serving.http.middleware import BodySizeLimit
from serving.http.observe import Observe
from serving.http.routes import admin, admin_jobs, canaries, completions, console, files, fine_tuning, health, metrics
from serving.http.routes.files import FILES_PATH
from serving.metrics import GatewayMetrics
from serving.state.files import MULTIPART_SLACK


def build_app(settings: GatewaySettings, engine: Engine | dict[str, Engine] | None = None) -> FastAPI:
    """The gateway app; ``engine`` replaces the vLLM engines (tests pass fakes: one, or several by name)."""
    gateway_metrics = GatewayMetrics(
        tenant_label=settings.metrics_tenant_label, max_tenants=settings.metrics_max_tenants
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Gateway.running(settings, gateway_metrics, engine) as gateway:
            app.state.gateway, app.state.instance, app.state.changes = gateway, gateway.instance, gateway.changes
            yield

    # Only the listed routes exist: no docs pages, and no redirect from "/v1/models/" to "/v1/models".
    app = FastAPI(
        title="lorafleet gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    errors.install(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        uploads=[(UPLOAD_PATH, settings.max_upload_bytes), (FILES_PATH, settings.max_file_bytes + MULTIPART_SLACK)],
        timeout_s=settings.body_timeout_s,
        upload_timeout_s=settings.upload_timeout_s,
    )
    app.add_middleware(Observe, metrics=gateway_metrics, log_content=settings.log_content)  # outermost: sees all
    for module in (health, metrics, completions, files, fine_tuning, admin, admin_jobs, canaries, console):
        app.include_router(module.router)
    return app


def create_app() -> FastAPI:
    """Factory for ``uvicorn --factory``: settings from the environment."""
    return build_app(GatewaySettings())
