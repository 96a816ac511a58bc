"""The app factory: `create_app(settings)` builds a FastAPI app around one `ModelService`."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ml_service import __version__
from ml_service.backend.api import build_router
from ml_service.backend.dependencies import AppDependencies
from ml_service.backend.errors import install_error_handlers
from ml_service.contract import ModelService, load_service_class
from ml_service.settings import Settings, get_settings

log = logging.getLogger("ml_service")


def create_app(settings: Settings | None = None, service: ModelService | None = None) -> FastAPI:
    """Build the app for `settings.service` (by name), or for an already built `service` (tests).

    The service's `load()` runs once in the app's lifespan, before the first request.
    """
    settings = settings or get_settings()
    if service is None:
        service = load_service_class(settings.service)(settings)
    deps = AppDependencies(settings=settings, service=service)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.load()
        deps.engine = service.create_engine()
        deps.engine.start()
        deps.ready = True
        log.info("serving %s (%s)", service.name, service.model_id)
        try:
            yield
        finally:
            deps.ready = False
            deps.engine.stop()

    app = FastAPI(
        title=f"ml_service: {service.name}",
        version=__version__,
        description=f"{service.description}.\n\nErrors: 400 bad request (with `errors`), "
        "403 the model failed on valid input, 503 the queue is full (retry after `Retry-After` "
        "seconds).",
        lifespan=lifespan,
    )
    app.state.deps = deps
    install_error_handlers(app)
    app.include_router(build_router(type(service)))
    return app
