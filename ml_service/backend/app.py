"""The app factory: `create_app(settings)` builds a FastAPI app that loads its model at start-up."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from lib.inference import InferenceService
from ml_service import __version__
from ml_service.backend.api import router
from ml_service.backend.dependencies import AppDependencies
from ml_service.backend.errors import install_error_handlers
from ml_service.settings import Settings, get_settings

log = logging.getLogger("ml_service")


def load_service(settings: Settings) -> InferenceService:
    """The service the settings ask for: a checkpoint, or (only if asked) a random preset."""
    if settings.random_preset:
        return InferenceService.random_baseline(settings.random_preset)
    return InferenceService.from_checkpoint(
        settings.checkpoint, device=settings.device, dtype=getattr(torch, settings.dtype)
    )


def create_app(
    settings: Settings | None = None, service: InferenceService | None = None
) -> FastAPI:
    """Build the app. Pass `service` to reuse an already loaded model (tests do)."""
    settings = settings or get_settings()
    deps = AppDependencies(settings=settings, service=service)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if deps.service is None:
            deps.service = load_service(settings)
            log.info("serving %s from %s", deps.service.model_id, deps.service.source)
        yield

    app = FastAPI(
        title="Russian GPT text generation",
        version=__version__,
        description="Generate Russian text with a GPT-2-family model trained by this repository. "
        "Errors: 400 bad request (with `errors`), 403 model failure.",
        lifespan=lifespan,
    )
    app.state.deps = deps
    install_error_handlers(app)
    app.include_router(router)
    return app
