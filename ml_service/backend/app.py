"""The app factory: `create_app(settings)` builds a FastAPI app around one `ModelService`."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ml_service import __version__
from ml_service.backend.api import build_router
from ml_service.backend.dependencies import AppDependencies
from ml_service.backend.errors import install_error_handlers
from ml_service.backend.ui import install_ui
from ml_service.batching import MicroBatcher
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
    batcher = MicroBatcher(service.predict, settings.max_batch_size, settings.batch_wait_ms / 1000)
    deps = AppDependencies(settings=settings, service=service, batcher=batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.load()
        batcher.start()
        deps.ready = True
        log.info("serving %s (%s)", service.name, service.model_id)
        try:
            yield
        finally:
            deps.ready = False
            batcher.stop()

    app = FastAPI(
        title=f"ml_service: {service.name}",
        version=__version__,
        description=f"{service.description}.\n\nErrors: 400 bad request (with `errors`), "
        "403 the model failed on valid input.",
        lifespan=lifespan,
        docs_url=None,  # install_ui serves /docs and /redoc from local assets
        redoc_url=None,
    )
    app.state.deps = deps
    install_error_handlers(app)
    app.include_router(build_router(type(service)))
    install_ui(app)
    return app
