"""The app factory: `create_app(settings)` builds a FastAPI app around one `ModelService`."""

from __future__ import annotations

import asyncio
import logging
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ml_service import __version__
from ml_service.backend.api import build_router
from ml_service.backend.dependencies import AppDependencies
from ml_service.backend.errors import MODEL_ROUTE_ERRORS, describe_errors, install_error_handlers
from ml_service.backend.ops import build_ops_router
from ml_service.backend.security import (
    INFO_ROUTES,
    BodyLimit,
    Guard,
    HeaderLimit,
    InfoRouteGuard,
)
from ml_service.backend.ui import install_ui
from ml_service.cache import ResponseCache
from ml_service.contract import ModelService, load_service_class
from ml_service.hosting import ModelHost
from ml_service.observability import AccessLog, ServiceMetrics, access_log
from ml_service.settings import Settings, get_settings
from ml_service.shared import SharedStore
from ml_service.shutdown import ShutdownGrace
from ml_service.traffic import SplitSync

log = logging.getLogger("ml_service")


def create_app(settings: Settings | None = None, service: ModelService | None = None) -> FastAPI:
    """Build the app for `settings.service` (by name), or for an already built `service` (tests).

    The model is loaded and warmed up in the app's lifespan: in the background by default (the
    server answers /health at once and /ready once the model is ready), or before the server
    accepts connections with `background_load=False`.
    """
    settings = settings or get_settings()
    if service is None:
        service = load_service_class(settings.service)(settings)
    metrics = ServiceMetrics()
    host = ModelHost(settings, service, metrics)
    shared = SharedStore(settings.redis_url, settings.redis_timeout_ms, metrics.registry)
    cache = ResponseCache(settings, shared, metrics.registry)
    deps = AppDependencies(settings, host, metrics, shared, cache)
    split_sync = SplitSync(shared)  # the fleet's A/B split, through Redis when there is one

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        grace = ShutdownGrace(host, settings.shutdown_grace_s)
        grace.install(asyncio.get_running_loop())
        loading = asyncio.create_task(host.start())
        syncing = asyncio.create_task(split_sync.run(host)) if shared.enabled else None
        if not settings.background_load:
            await loading
        try:
            yield
        finally:
            await grace.close()
            loading.cancel()
            if syncing is not None:
                syncing.cancel()
            await host.stop(settings.shutdown_grace_s)
            await shared.close()

    app = FastAPI(
        title=f"ml_service: {service.name}",
        version=__version__,
        description=f"{service.description}.\n\nErrors of the model routes (`detail`, "
        "`errors`; OpenAI's shape on /v1):\n\n" + describe_errors(*MODEL_ROUTE_ERRORS),
        lifespan=lifespan,
        docs_url=None,  # install_ui serves /docs and /redoc from local assets
        redoc_url=None,
    )
    app.state.deps = deps
    app.state.split_sync = split_sync
    app.state.guard = Guard(settings, shared)
    install_error_handlers(app)
    app.include_router(build_router(type(service)))
    # text generation: the OpenAI routes (/v1)
    for router in type(service).extra_routers():
        app.include_router(router)
    app.include_router(build_ops_router())
    install_ui(app)
    if settings.guard_info_routes:
        if settings.api_keys:
            paths = INFO_ROUTES | {app.openapi_url}
            app.add_middleware(InfoRouteGuard, guard=app.state.guard, paths=paths)
        else:
            log.warning("ML_SERVICE_GUARD_INFO_ROUTES has no effect without ML_SERVICE_API_KEYS")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HeaderLimit, max_bytes=settings.max_header_bytes)
    app.add_middleware(AccessLog, metrics=metrics, log_prompts=settings.log_prompts)
    _log_access_as_json_lines()
    return app


def _log_access_as_json_lines() -> None:
    """The access log: bare JSON lines on stdout (one per request), not mixed with other logs."""
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False
