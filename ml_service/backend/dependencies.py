"""What routes receive: the settings, the served model (service + engine) and the metrics,
injected by type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from ml_service.backend.errors import ModelNotReady
from ml_service.backend.security import bearer_token
from ml_service.cache import ResponseCache
from ml_service.hosting import Loaded, ModelHost
from ml_service.observability import ServiceMetrics
from ml_service.settings import Settings
from ml_service.shared import SharedStore
from ml_service.traffic import client_key


@dataclass
class AppDependencies:
    settings: Settings
    host: ModelHost
    metrics: ServiceMetrics
    shared: SharedStore  # the fleet's Redis (or none): use its `run` for every call
    cache: ResponseCache  # answers repeated deterministic requests (in memory or in Redis)


class RequestDependencies:
    """The app's dependencies with the version chosen for one request as `model`: the one its
    `X-Model-Version` header pins, else the traffic split's choice for its client, else the
    default. A route reads it once, so a reload in between never mixes one version's tokenizer
    with another's engine."""

    def __init__(self, app: AppDependencies, request: Request, model: Loaded):
        self.app = app
        self.request = request
        self.model = model
        request.state.model_version = model.version  # the X-Model-Version header, the access log

    def __getattr__(self, name: str):
        return getattr(self.app, name)

    def pin(self, version: str) -> Loaded:
        """The request asked for `version` by name (the OpenAI routes' `model`); a 404 naming
        `model` unless it is loaded here (VersionNotLoaded: errors.py)."""
        self.model = self.app.host.choose("", pinned=version, pinned_by="model")
        self.request.state.model_version = self.model.version
        return self.model


async def get_dependencies(request: Request) -> RequestDependencies:
    deps: AppDependencies = request.app.state.deps
    host = deps.host
    if host.current is None:
        raise ModelNotReady(failed=host.error is not None)
    pinned = request.headers.get("x-model-version", "").strip() or None
    api_key = bearer_token(request) if deps.settings.api_keys else None
    # a pin this replica does not hold: 404 naming x-model-version (VersionNotLoaded: errors.py)
    chosen = host.choose(client_key(request, api_key), pinned, pinned_by="x-model-version")
    return RequestDependencies(deps, request, chosen)


DepsDep = Annotated[RequestDependencies, Depends(get_dependencies)]
