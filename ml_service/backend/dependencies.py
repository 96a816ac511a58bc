"""What routes receive: the loaded `InferenceService` and the `Settings`, injected by type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from lib.inference import InferenceService
from ml_service.backend.errors import ServiceError
from ml_service.settings import Settings


class ModelNotReady(ServiceError):
    status_code = 503
    detail = "model is not loaded yet"


@dataclass
class AppDependencies:
    settings: Settings
    service: InferenceService | None = None


def get_dependencies(request: Request) -> AppDependencies:
    return request.app.state.deps


def get_service(deps: Annotated[AppDependencies, Depends(get_dependencies)]) -> InferenceService:
    if deps.service is None:
        raise ModelNotReady()
    return deps.service


def get_app_settings(deps: Annotated[AppDependencies, Depends(get_dependencies)]) -> Settings:
    return deps.settings


ServiceDep = Annotated[InferenceService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
