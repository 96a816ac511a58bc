"""What routes receive: the settings, the served model (service + engine) and the metrics,
injected by type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from ml_service.backend.errors import ModelNotReady
from ml_service.hosting import Loaded, ModelHost
from ml_service.observability import ServiceMetrics
from ml_service.settings import Settings
from ml_service.shared import SharedStore


@dataclass
class AppDependencies:
    settings: Settings
    host: ModelHost
    metrics: ServiceMetrics
    shared: SharedStore  # the fleet's Redis (or none): use its `run` for every call

    @property
    def model(self) -> Loaded:
        """The model serving now. A route reads it once per request, so a reload in between
        never mixes one version's tokenizer with another's engine."""
        current = self.host.current
        if current is None:
            raise ModelNotReady(failed=self.host.error is not None)
        return current


async def get_dependencies(request: Request) -> AppDependencies:
    deps: AppDependencies = request.app.state.deps
    if deps.host.current is None:
        raise ModelNotReady(failed=deps.host.error is not None)
    return deps


DepsDep = Annotated[AppDependencies, Depends(get_dependencies)]
