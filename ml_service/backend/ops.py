"""Operations routes: liveness, readiness, Prometheus metrics, and model versions (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ml_service.backend.bodies import read_json_object, validated
from ml_service.backend.errors import (
    ADMIN_ROUTE_ERRORS,
    BadRequest,
    Unready,
    openapi_responses,
)
from ml_service.backend.schemas import STRICT, HealthResponse, Text
from ml_service.backend.security import require_admin
from ml_service.hosting import list_versions
from ml_service.observability import METRICS_CONTENT_TYPE
from ml_service.traffic import TrafficSplit


class ReadyResponse(BaseModel):
    status: str = Field(
        ...,
        description="`ready`, `loading`, `failed`, or `restarting` (the engine's process "
        "crashed and a new one is loading the model)",
    )
    model: str | None = None
    version: str | None = None
    error: str | None = None


class ReloadRequest(BaseModel):
    model_config = ConfigDict(**STRICT, extra="forbid")
    version: Text | None = Field(
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


class TrafficRequest(BaseModel):
    model_config = ConfigDict(**STRICT, extra="forbid")
    split: dict[str, float] | str | None = Field(
        ...,
        description='weights by version (`{"2026-11-20": 90, "2026-11-28": 10}` or '
        '`"2026-11-20=90,2026-11-28=10"`); null: the default version serves everything',
        examples=[{"2026-11-20": 90, "2026-11-28": 10}],
    )


class TrafficResponse(BaseModel):
    split: dict[str, float] | None = Field(..., description="the weights in force (null: none)")
    shares: dict[str, float] = Field(..., description="each version's share of the traffic")
    default: str | None = Field(..., description="the version serving without a split or a pin")
    loaded: list[str] = Field(..., description="the versions held in memory on this replica")
    shadow: str | None = Field(None, description="the version receiving a copy of the traffic")
    requests: dict[str, float] = Field(
        ..., description="model requests routed to each version by this replica since it started"
    )
    shared: bool = Field(
        ..., description="whether the split was published to the fleet through Redis (POST)"
    )


# an unknown version, one that fails to load, or a bad split: a 400 (errors.py maps hosting's
# VersionError and traffic's BadSplit)
ADMIN_ERRORS = openapi_responses(*ADMIN_ROUTE_ERRORS)


def build_ops_router() -> APIRouter:
    router = APIRouter()
    admin = APIRouter(dependencies=[Depends(require_admin)], responses=ADMIN_ERRORS)

    @router.get("/health", response_model=HealthResponse, summary="liveness")
    async def health() -> HealthResponse:
        """The process answers (also while the model is busy or still loading)."""
        return HealthResponse(status="ok")

    @router.get(
        "/ready",
        response_model=ReadyResponse,
        responses=openapi_responses(Unready, model=ReadyResponse),
        summary="readiness",
    )
    async def ready(request: Request):
        """200 once the model is loaded and warmed up; 503 before (or if loading failed), and
        while a crashed engine process is replaced."""
        host = request.app.state.deps.host
        # ready once the split's and the shadow's versions are loaded too (else the first
        # clients would all reach the default version)
        current = host.current if host.started else None
        if current is not None and not host.engines_alive():
            # an engine that restarts (our engine process) is replaced after a crash; a dead
            # engine of another kind (vLLM) is not
            restarts = all(v.engine.capabilities.restarts for v in host.loaded.values())
            body = ReadyResponse(
                status="restarting" if restarts else "failed",
                model=current.service.model_id,
                version=current.version,
                error="the generation engine's process is restarting after a crash"
                if restarts
                else "the generation engine died; restart the server",
            )
            raise Unready(body.model_dump())
        if current is not None:
            return ReadyResponse(
                status="ready", model=current.service.model_id, version=current.version
            )
        body = ReadyResponse(status="failed" if host.error else "loading", error=host.error)
        raise Unready(body.model_dump())

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    )
    async def metrics(request: Request) -> Response:
        """Requests, failures, latencies, queue, batch and token metrics, in Prometheus text
        format (docs/reference/metrics.md lists them)."""
        return Response(request.app.state.deps.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @admin.get(
        "/admin/versions",
        response_model=VersionsResponse,
        summary="model versions (admin)",
    )
    async def versions(request: Request) -> VersionsResponse:
        """The versions in the models directory, and the one serving now."""
        deps = request.app.state.deps
        current = deps.host.current
        found = list_versions(deps.settings.models_dir) if deps.settings.models_dir else []
        return VersionsResponse(current=current.version if current else None, versions=found)

    @admin.post(
        "/admin/reload",
        response_model=ReloadResponse,
        summary="switch model version (admin)",
    )
    async def reload(request: Request, body: Annotated[ReloadRequest, Depends(_reload_body)]):
        """Load a version and swap it in. In-flight requests finish on the old one; if the new
        one fails to load, the old one keeps serving and the answer says why."""
        new, old = await request.app.state.deps.host.reload(body.version)
        return ReloadResponse(
            version=new.version,
            model=new.service.model_id,
            previous_version=old.version if old else None,
            previous_model=old.service.model_id if old else None,
        )

    @admin.get(
        "/admin/traffic",
        response_model=TrafficResponse,
        summary="A/B traffic split (admin)",
    )
    async def get_traffic(request: Request) -> TrafficResponse:
        """The split in force on this replica, the versions it holds and its request counts."""
        return _traffic(request, shared=False)

    @admin.post(
        "/admin/traffic",
        response_model=TrafficResponse,
        summary="change the A/B traffic split (admin)",
    )
    async def set_traffic(request: Request) -> TrafficResponse:
        """Load the versions the split names (those not held yet), then route by it; with Redis
        the split is published and every replica applies it within a second or so. A version
        that is unknown or fails to load: 400, and the split in force stays."""
        body = validated(TrafficRequest, await read_json_object(request))
        host = request.app.state.deps.host
        if request.app.state.deps.settings.models_dir is None:
            raise BadRequest.one("split", "a traffic split needs ML_SERVICE_MODELS_DIR (versions)")
        if body.split is None:
            split = None
            await host.clear_traffic()
        else:
            split = (
                TrafficSplit.parse(body.split)
                if isinstance(body.split, str)
                else TrafficSplit.of(body.split)
            )
            await host.set_traffic(split)
        published = await request.app.state.split_sync.publish(split)
        return _traffic(request, shared=published)

    router.include_router(admin)
    return router


def _traffic(request: Request, shared: bool) -> TrafficResponse:
    deps = request.app.state.deps
    host = deps.host
    requests = {
        s.labels["version"]: s.value
        for family in deps.metrics.version_requests.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    return TrafficResponse(
        split=dict(host.split.weights) if host.split else None,
        shares=host.split.shares() if host.split else {},
        default=host.current.version if host.current else None,
        loaded=sorted(host.loaded),
        shadow=host.shadow.version if host.shadow else None,
        requests=requests,
        shared=shared,
    )


async def _reload_body(request: Request) -> ReloadRequest:
    if not await request.body():
        return ReloadRequest()
    return validated(ReloadRequest, await read_json_object(request))
