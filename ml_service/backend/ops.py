"""Operations routes: liveness, readiness, Prometheus metrics, model versions and LoRA adapters
(admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lib.inference.adapter_names import name_problem
from ml_service.backend.bodies import read_json_object, validated
from ml_service.backend.errors import (
    ADAPTER_ROUTE_ERRORS,
    ADMIN_ROUTE_ERRORS,
    BadRequest,
    Unready,
    openapi_responses,
)
from ml_service.backend.openai_serving import served_name
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


class AdapterRequest(BaseModel):
    model_config = ConfigDict(**STRICT, extra="forbid")
    name: Text = Field(
        ...,
        description="the adapter's name: 1-64 letters, digits, `.`, `_` or `-` (model "
        "`<model>:<name>` on /v1, `adapter` on /forward); an idle adapter of that name is replaced",
        examples=["manpages"],
    )
    path: Text = Field(
        ...,
        min_length=1,
        max_length=4096,
        description="a PEFT LoRA directory on the server's disk (adapter_config.json and "
        "adapter_model.safetensors, as `train_distributed.py --lora-rank` writes)",
        examples=["runs/lora-manpages/final"],
    )

    @field_validator("name")
    @classmethod
    def _a_name(cls, v: str) -> str:
        if problem := name_problem(v):
            raise ValueError(problem)
        return v


class AdapterInfo(BaseModel):
    name: str
    model: str = Field(..., description="its model id on /v1 (`<model>:<name>`)")
    rank: int
    sha256: str = Field(..., description="of its weights file")
    bytes: int = Field(..., description="the memory it takes")
    running: int = Field(0, description="requests generating with it now")
    removing: bool = Field(False, description="removed: unloaded once its running requests end")
    added: bool = Field(
        False, description="added at run time (POST), not found in ML_SERVICE_ADAPTERS_DIR"
    )


class AdaptersResponse(BaseModel):
    adapters: list[AdapterInfo]
    budget_mb: int = Field(..., description="ML_SERVICE_MAX_ADAPTER_MB")


class AdapterRemoved(BaseModel):
    name: str
    removed: bool = Field(..., description="unloaded now (false: once its running requests end)")
    waiting_for: int = Field(..., description="running requests it is unloaded after")


# read from the path by the route itself: a declared parameter would bring FastAPI's 422
ADAPTER_NAME = {
    "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
}
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

    @admin.get("/admin/adapters", response_model=AdaptersResponse, summary="LoRA adapters (admin)")
    async def adapters(request: Request) -> AdaptersResponse:
        """The adapters the default version serves: each one's model id, rank, memory, and the
        requests generating with it now."""
        return AdaptersResponse(
            adapters=await _adapters(request),
            budget_mb=request.app.state.deps.settings.max_adapter_mb,
        )

    @admin.post("/admin/adapters", response_model=AdapterInfo, summary="add a LoRA adapter (admin)")
    async def add_adapter(request: Request) -> AdapterInfo:
        """Load a PEFT LoRA directory of the server's disk and serve it under `name` (every
        loaded version, and those loaded later, a reload's included). 400 with the reason when
        it cannot serve it (not a LoRA of this model, trained on another checkpoint, a corrupt
        file, over the memory budget); what serves keeps serving."""
        body = validated(AdapterRequest, await read_json_object(request))
        _check_engine(request)
        await request.app.state.deps.host.add_adapter(body.name, body.path)
        return next(a for a in await _adapters(request) if a.name == body.name)

    @router.delete(
        "/admin/adapters/{name}",
        response_model=AdapterRemoved,
        dependencies=[Depends(require_admin)],
        responses=openapi_responses(*ADAPTER_ROUTE_ERRORS),
        openapi_extra=ADAPTER_NAME,
        summary="remove a LoRA adapter (admin)",
    )
    async def remove_adapter(request: Request) -> AdapterRemoved:
        """Stop serving an adapter: requests that name it get 404 from now on; the ones running
        finish with it, then it is unloaded. 404 when it is not loaded. An adapter of
        ML_SERVICE_ADAPTERS_DIR comes back at the next reload unless its directory is gone."""
        _check_engine(request)
        name = request.path_params["name"]
        waiting = await request.app.state.deps.host.remove_adapter(name)
        return AdapterRemoved(name=name, removed=waiting == 0, waiting_for=waiting)

    router.include_router(admin)
    return router


def _check_engine(request: Request) -> None:
    current = request.app.state.deps.host.current
    if current is not None and not current.engine.capabilities.adapters:
        kind = request.app.state.deps.settings.engine
        raise BadRequest.one(
            "adapter",
            f"LoRA adapters are not served with ML_SERVICE_ENGINE={kind}: serve them with the "
            "process or thread engine, or merge one into a checkpoint (train_distributed.py "
            "--merge)",
        )


async def _adapters(request: Request) -> list[AdapterInfo]:
    host = request.app.state.deps.host
    listed = await host.list_adapters()
    base = served_name(host.current)  # as /v1/models lists them
    return [
        AdapterInfo(**a, model=f"{base}:{a['name']}", added=a["name"] in host.added_adapters)
        for a in listed
    ]


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
