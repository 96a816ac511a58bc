"""What routes receive: the loaded service, its engine and the settings, injected by type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from ml_service.backend.errors import ServiceError
from ml_service.batching import Engine
from ml_service.contract import ModelService
from ml_service.settings import Settings


class ModelNotReady(ServiceError):
    status_code = 503
    detail = "model is not loaded yet"


@dataclass
class AppDependencies:
    settings: Settings
    service: ModelService
    engine: Engine | None = None  # made by the service after load(), in the app's lifespan
    ready: bool = False


def get_dependencies(request: Request) -> AppDependencies:
    deps: AppDependencies = request.app.state.deps
    if not deps.ready:
        raise ModelNotReady()
    return deps


DepsDep = Annotated[AppDependencies, Depends(get_dependencies)]
