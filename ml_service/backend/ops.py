"""Operations routes: liveness, readiness, Prometheus metrics, and model versions (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ml_service.backend.api import read_json_object, validate_model
from ml_service.backend.errors import BadRequest
from ml_service.backend.schemas import ErrorResponse, HealthResponse
from ml_service.backend.security import require_admin
from ml_service.hosting import ReloadFailed, VersionNotFound, list_versions
from ml_service.observability import METRICS_CONTENT_TYPE


class ReadyResponse(BaseModel):
    status: str = Field(..., description="`ready`, `loading` or `failed`")
    model: str | None = None
    version: str | None = None
    error: str | None = None


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="a subdirectory of ML_SERVICE_MODELS_DIR, by name (no path separators, not "
        "`.` or `..`); omitted: the configured version (re-read from disk)",
    )

    @field_validator("version")
    @classmethod
    def _a_name_not_a_path(cls, v: str | None) -> str | None:
        if v is not None and (v in (".", "..") or any(c in v for c in "/\\\0")):
            raise ValueError("a version is a directory name: no path separators, not . or ..")
        return v


class ReloadResponse(BaseModel):
    version: str | None
    model: str
    previous_version: str | None
    previous_model: str | None


class VersionsResponse(BaseModel):
    current: str | None
    versions: list[str]


ADMIN_ERRORS = {
    400: {"model": ErrorResponse, "description": "unknown version, or it failed to load"},
    401: {"model": ErrorResponse, "description": "missing or wrong admin token"},
    429: {
        "model": ErrorResponse,
        "description": "too many wrong keys or tokens from this address (with `Retry-After`)",
    },
}


def build_ops_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health", response_model=HealthResponse, summary="liveness")
    async def health() -> HealthResponse:
        """The process answers (also while the model is busy or still loading)."""
        return HealthResponse(status="ok")

    @router.get(
        "/ready",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse, "description": "loading, or the load failed"}},
        summary="readiness",
    )
    async def ready(request: Request):
        """200 once the model is loaded and warmed up; 503 before (or if loading failed)."""
        host = request.app.state.deps.host
        current = host.current
        if current is not None:
            return ReadyResponse(
                status="ready", model=current.service.model_id, version=current.version
            )
        body = ReadyResponse(status="failed" if host.error else "loading", error=host.error)
        return JSONResponse(body.model_dump(), status_code=503)

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    )
    async def metrics(request: Request) -> Response:
        """Requests, failures, latencies, queue, batch and token metrics, in Prometheus text
        format (HOW_TO_USE.md lists them)."""
        return Response(request.app.state.deps.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @router.get(
        "/admin/versions",
        response_model=VersionsResponse,
        responses=ADMIN_ERRORS,
        dependencies=[Depends(require_admin)],
        summary="model versions (admin)",
    )
    async def versions(request: Request) -> VersionsResponse:
        """The versions in the models directory, and the one serving now."""
        deps = request.app.state.deps
        current = deps.host.current
        try:
            found = list_versions(deps.settings.models_dir) if deps.settings.models_dir else []
        except VersionNotFound as e:
            raise BadRequest.one("version", str(e)) from None
        return VersionsResponse(current=current.version if current else None, versions=found)

    @router.post(
        "/admin/reload",
        response_model=ReloadResponse,
        responses=ADMIN_ERRORS,
        dependencies=[Depends(require_admin)],
        summary="switch model version (admin)",
    )
    async def reload(request: Request, body: Annotated[ReloadRequest, Depends(_reload_body)]):
        """Load a version and swap it in. In-flight requests finish on the old one; if the new
        one fails to load, the old one keeps serving and the answer says why."""
        host = request.app.state.deps.host
        try:
            new, old = await host.reload(body.version)
        except (VersionNotFound, ReloadFailed) as e:
            raise BadRequest.one("version", str(e)) from None
        return ReloadResponse(
            version=new.version,
            model=new.service.model_id,
            previous_version=old.version if old else None,
            previous_model=old.service.model_id if old else None,
        )

    return router


async def _reload_body(request: Request) -> ReloadRequest:
    if not await request.body():
        return ReloadRequest()
    return validate_model(ReloadRequest, await read_json_object(request))
