"""What routes receive: the settings, the served model (service + engine) and the metrics,
injected by type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from ml_service.backend.errors import ServiceError
from ml_service.hosting import Loaded, ModelHost
from ml_service.observability import ServiceMetrics
from ml_service.settings import Settings


class ModelNotReady(ServiceError):
    status_code = 503
    detail = "model is not loaded yet"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


@dataclass
class AppDependencies:
    settings: Settings
    host: ModelHost
    metrics: ServiceMetrics

    @property
    def model(self) -> Loaded:
        """The model serving now. A route reads it once per request, so a reload in between
        never mixes one version's tokenizer with another's engine."""
        current = self.host.current
        if current is None:
            raise ModelNotReady()
        return current


async def get_dependencies(request: Request) -> AppDependencies:
    deps: AppDependencies = request.app.state.deps
    if deps.host.current is None:
        raise ModelNotReady()
    return deps


DepsDep = Annotated[AppDependencies, Depends(get_dependencies)]
